"""Image sources the shard writer understands: `digits`, `shapes`, `imagefolder` and `imagenet`.

A source lists its samples on the driver (cheap: names, labels, sizes) and reads one sample's
bytes inside a writer task. Sources are small picklable objects so Ray can ship them to tasks.

- `digits`: scikit-learn's bundled 8x8 digits (values 0..16), upscaled to 32 px and stored as PNG.
  A fixed stratified 80/20 split (seed 0, independent of the writer's seed) gives `train`/`val`.
- `shapes`: ten object shapes over photo backgrounds with clutter, generated from a fixed seed
  (pipeline/data/shapes.py says what and why): 4000 `train` and 1000 `val` 64 px PNGs, no download.
- `imagefolder`: ROOT/<class>/**/<image>; classes are the sorted folder names.
- `imagenet`: ROOT/train/<wnid>/*.JPEG and ROOT/val in either layout: class folders, or flat files
  plus a label file (`LOC_val_solution.csv`, the devkit's `ILSVRC2012_validation_ground_truth.txt`
  with its `meta.mat`, or a text file of "FILE WNID" lines). Class indices follow the sorted wnids
  of ROOT/train (or of the devkit's leaf synsets), as the standard ImageNet tools do.

Roots may be any fsspec URL. Keys are the file's path below ROOT without extension, with dots and
spaces replaced by "_" (webdataset splits keys at the first dot); duplicates get a numeric suffix.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from pipeline.data import shapes
from pipeline.data.fsutil import url_to_fs
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SOURCE_NAMES = ("digits", "shapes", "imagefolder", "imagenet")
DIGITS_SIZE = 32
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class SampleRef:
    """One source sample: its shard key, label, display name, where to read it and its size estimate."""

    key: str
    label: int
    file: str
    location: str | int
    size: int


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[Any, Any]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def digits_split_indices(split: str) -> list[int]:
    """Indices into load_digits() for `train` or `val`: stratified 80/20 with a fixed seed."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    _, target = _digits_arrays()
    train_idx, val_idx = train_test_split(
        np.arange(len(target)),
        test_size=DIGITS_VAL_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=target,
    )
    return sorted(int(i) for i in (train_idx if split == "train" else val_idx))


@dataclass(frozen=True)
class DigitsSource:
    split: str
    name: str = "digits"

    def __post_init__(self) -> None:
        if self.split not in ("train", "val"):
            raise PipelineError(f"digits: unknown split {self.split!r}; use 'train' or 'val'")

    @property
    def classes(self) -> list[str]:
        return [str(i) for i in range(10)]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "origin": "sklearn.datasets.load_digits",
            "image_size": DIGITS_SIZE,
            "split_seed": DIGITS_SPLIT_SEED,
            "val_fraction": DIGITS_VAL_FRACTION,
        }

    def samples(self) -> list[SampleRef]:
        _, target = _digits_arrays()
        return [
            SampleRef(key=f"digits_{i:05d}", label=int(target[i]), file=f"digits[{i}]", location=i, size=400)
            for i in digits_split_indices(self.split)
        ]

    def read(self, ref: SampleRef) -> bytes:
        from PIL import Image

        images, _ = _digits_arrays()
        pixels = (images[int(ref.location)] * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")
        image = Image.fromarray(pixels, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ShapesSource:
    """The generated shapes data set; `seed` and `count` exist for tests (jobs use the defaults)."""

    split: str
    seed: int = shapes.SEED
    count: int | None = None
    name: str = "shapes"

    def __post_init__(self) -> None:
        if self.split not in shapes.COUNTS:
            raise PipelineError(f"shapes: unknown split {self.split!r}; use 'train' or 'val'")

    @property
    def classes(self) -> list[str]:
        return list(shapes.CLASSES)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "origin": "pipeline.data.shapes (backgrounds: sklearn.datasets.load_sample_images)",
            "image_size": shapes.IMAGE_SIZE,
            "generator_seed": self.seed,
            "split": self.split,
        }

    def samples(self) -> list[SampleRef]:
        count = shapes.COUNTS[self.split] if self.count is None else self.count
        return [
            SampleRef(key=f"shapes_{self.split}_{i:05d}", label=shapes.label_of(i), file=f"shapes[{self.split}][{i}]",
                      location=i, size=9000)
            for i in range(count)
        ]

    def read(self, ref: SampleRef) -> bytes:
        return shapes.png_bytes(self.seed, self.split, int(ref.location))


# --------------------------------------------------------------------------- folders


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(fs: Any, path: str, label: str) -> list[str]:
    try:
        if not fs.isdir(path):
            raise PipelineError(f"{label}: not a directory")
        entries = fs.ls(path, detail=True)
    except PipelineError:
        raise
    except FileNotFoundError:
        raise PipelineError(f"{label}: not found") from None
    except Exception as exc:
        raise PipelineError(f"{label}: cannot list: {type(exc).__name__}: {exc}") from None
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")


def _image_files(fs: Any, path: str) -> dict[str, int]:
    """Image files below `path` (recursively) -> size in bytes."""
    found = fs.find(path, detail=True)
    return {name: int(info.get("size") or 0) for name, info in sorted(found.items()) if _is_image(name)}


_KEY_UNSAFE = re.compile(r"[.\s]+")


def make_key(relative_path: str) -> str:
    stem = relative_path.rsplit(".", 1)[0] if "." in posixpath.basename(relative_path) else relative_path
    return _KEY_UNSAFE.sub("_", stem)


def _unique_keys(refs: list[SampleRef]) -> list[SampleRef]:
    seen: dict[str, int] = {}
    unique = []
    for ref in refs:
        key = ref.key
        if key in seen:
            seen[key] += 1
            key = f"{key}_{seen[ref.key]}"
            while key in seen:  # "a_2" may itself be a real key
                seen[ref.key] += 1
                key = f"{ref.key}_{seen[ref.key]}"
        seen.setdefault(key, 1)
        unique.append(SampleRef(key, ref.label, ref.file, ref.location, ref.size))
    return unique


def _class_folder_samples(
    fs: Any, base: str, label_root: str, classes: list[str], folders: list[str], key_base: str
) -> list[SampleRef]:
    """Images of each class folder under `base`; an empty class folder is an error."""
    index = {name: i for i, name in enumerate(classes)}
    refs: list[SampleRef] = []
    for folder in folders:
        if folder not in index:
            raise PipelineError(f"{label_root}/{folder}: class folder not among the training classes")
        files = _image_files(fs, f"{base}/{folder}")
        if not files:
            raise PipelineError(f"{label_root}/{folder}: empty class folder (no image files)")
        for path, size in files.items():
            relative = path[len(key_base) :].lstrip("/")
            refs.append(SampleRef(make_key(relative), index[folder], relative, fs.unstrip_protocol(path), size))
    return refs


@dataclass(frozen=True)
class FolderSource:
    root: str
    name: str = "imagefolder"

    @functools.cached_property
    def _fs(self) -> tuple[Any, str]:
        return url_to_fs(self.root)

    @property
    def classes(self) -> list[str]:
        fs, path = self._fs
        return _subdirs(fs, path, self.root)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "root": self.root}

    def samples(self) -> list[SampleRef]:
        fs, path = self._fs
        classes = self.classes
        if not classes:
            raise PipelineError(f"{self.root}: no class folders (expected ROOT/<class>/<image files>)")
        refs = _class_folder_samples(fs, path, self.root.rstrip("/"), classes, classes, path)
        return _unique_keys(refs)

    def read(self, ref: SampleRef) -> bytes:
        return _read_url(str(ref.location))


def _read_url(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as fh:
        return fh.read()


# --------------------------------------------------------------------------- imagenet


@dataclass(frozen=True)
class ImageNetSource:
    root: str
    split: str
    val_labels: str | None = None
    devkit_meta: str | None = None
    name: str = "imagenet"

    def __post_init__(self) -> None:
        if self.split not in ("train", "val"):
            raise PipelineError(f"imagenet: unknown split {self.split!r}; use 'train' or 'val'")

    @functools.cached_property
    def _fs(self) -> tuple[Any, str]:
        return url_to_fs(self.root)

    def _url(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"name": self.name, "root": self.root, "split": self.split}
        if self.split == "val" and self._val_is_flat():
            described["val_labels"] = self._label_file()
        return described

    def _train_classes(self) -> list[str] | None:
        fs, path = self._fs
        if not fs.isdir(f"{path}/train"):
            return None
        return _subdirs(fs, f"{path}/train", self._url("train"))

    def _val_is_flat(self) -> bool:
        fs, path = self._fs
        return not _subdirs(fs, f"{path}/val", self._url("val"))

    @functools.cached_property
    def classes(self) -> list[str]:  # type: ignore[override]
        train = self._train_classes()
        if train:
            return train
        if self.split == "train":
            raise PipelineError(f"{self._url('train')}: no class folders (expected train/<wnid>/*.JPEG)")
        if not self._val_is_flat():
            fs, path = self._fs
            return _subdirs(fs, f"{path}/val", self._url("val"))
        label_file = self._label_file()
        if self._is_devkit(label_file):
            return sorted(self._devkit_wnids().values())
        logger.warning("%s: no train/ folder; classes are the sorted wnids found in %s", self.root, label_file)
        return sorted(set(self._flat_labels().values()))

    def samples(self) -> list[SampleRef]:
        fs, path = self._fs
        classes = self.classes
        split_path = f"{path}/{self.split}"
        if not fs.isdir(split_path):
            raise PipelineError(f"{self._url(self.split)}: not found")
        if self.split == "train" or not self._val_is_flat():
            folders = _subdirs(fs, split_path, self._url(self.split))
            refs = _class_folder_samples(fs, split_path, self._url(self.split), classes, folders, split_path)
        else:
            refs = self._flat_val_samples(classes)
        if not refs:
            raise PipelineError(f"{self._url(self.split)}: no images found")
        return _unique_keys(refs)

    def read(self, ref: SampleRef) -> bytes:
        return _read_url(str(ref.location))

    # ----------------------------------------------------------------- flat validation folder

    def _flat_val_samples(self, classes: list[str]) -> list[SampleRef]:
        fs, path = self._fs
        labels = self._flat_labels()
        index = {name: i for i, name in enumerate(classes)}
        refs = []
        for file_path, size in _image_files(fs, f"{path}/val").items():
            relative = file_path[len(path) + len("/val") :].lstrip("/")
            stem = posixpath.basename(relative).rsplit(".", 1)[0]
            wnid = labels.get(stem)
            if wnid is None:
                raise PipelineError(f"{self._url('val', relative)}: no label in {self._label_file()}")
            if wnid not in index:
                raise PipelineError(f"{self._label_file()}: {stem}: wnid {wnid!r} is not a training class")
            refs.append(SampleRef(make_key(relative), index[wnid], relative, fs.unstrip_protocol(file_path), size))
        return refs

    def _label_file(self) -> str:
        if self.val_labels:
            return self.val_labels
        fs, path = self._fs
        for candidate in (
            "LOC_val_solution.csv",
            "ILSVRC2012_validation_ground_truth.txt",
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
            "val_labels.txt",
        ):
            if fs.isfile(f"{path}/{candidate}"):
                return self._url(candidate)
        raise PipelineError(
            f"{self._url('val')}: flat validation folder needs a label file: put LOC_val_solution.csv, "
            "ILSVRC2012_validation_ground_truth.txt (with the devkit's meta.mat) or val_labels.txt "
            "in ROOT, or pass --val-labels"
        )

    @staticmethod
    def _is_devkit(label_file: str) -> bool:
        return label_file.endswith("ILSVRC2012_validation_ground_truth.txt")

    def _flat_labels(self) -> dict[str, str]:
        return self._flat_label_map

    @functools.cached_property
    def _flat_label_map(self) -> dict[str, str]:
        """File stem -> wnid for the flat validation folder."""
        label_file = self._label_file()
        text = _read_url(label_file).decode("utf-8")
        if label_file.endswith(".csv"):
            return self._parse_loc_csv(text, label_file)
        lines = [line.split() for line in text.splitlines() if line.strip()]
        if lines and all(len(parts) == 1 for parts in lines):
            wnid_of_id = self._devkit_wnids()
            labels = {}
            for number, (ilsvrc_id,) in enumerate(lines, start=1):
                if int(ilsvrc_id) not in wnid_of_id:
                    raise PipelineError(f"{label_file}: line {number}: unknown ILSVRC2012_ID {ilsvrc_id}")
                labels[f"ILSVRC2012_val_{number:08d}"] = wnid_of_id[int(ilsvrc_id)]
            return labels
        labels = {}
        for number, parts in enumerate(lines, start=1):
            if len(parts) != 2:
                raise PipelineError(f"{label_file}: line {number}: expected 'FILE WNID', got {' '.join(parts)!r}")
            labels[posixpath.basename(parts[0]).rsplit(".", 1)[0]] = parts[1]
        return labels

    @staticmethod
    def _parse_loc_csv(text: str, label_file: str) -> dict[str, str]:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise PipelineError(f"{label_file}: expected a CSV header 'ImageId,PredictionString'")
        labels = {}
        for row in reader:
            prediction = (row["PredictionString"] or "").split()
            if not prediction:
                raise PipelineError(f"{label_file}: {row['ImageId']}: empty PredictionString")
            labels[row["ImageId"]] = prediction[0]
        return labels

    def _devkit_wnids(self) -> dict[int, str]:
        """ILSVRC2012_ID -> wnid for the 1000 leaf synsets of the devkit's meta.mat."""
        import scipy.io

        meta_url = self.devkit_meta
        if meta_url is None:
            fs, path = self._fs
            for candidate in ("ILSVRC2012_devkit_t12/data/meta.mat", "meta.mat"):
                if fs.isfile(f"{path}/{candidate}"):
                    meta_url = self._url(candidate)
                    break
        if meta_url is None:
            raise PipelineError(
                f"{self.root}: the devkit ground-truth file needs meta.mat "
                "(ROOT/ILSVRC2012_devkit_t12/data/meta.mat, ROOT/meta.mat, or --devkit-meta)"
            )
        try:
            synsets = scipy.io.loadmat(io.BytesIO(_read_url(meta_url)), squeeze_me=True)["synsets"]
            return {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets if int(row["num_children"]) == 0}
        except (KeyError, ValueError, TypeError) as exc:
            raise PipelineError(f"{meta_url}: not an ImageNet devkit meta.mat: {exc}") from None


def make_source(
    name: str,
    *,
    split: str,
    root: str | None = None,
    val_labels: str | None = None,
    devkit_meta: str | None = None,
) -> DigitsSource | ShapesSource | FolderSource | ImageNetSource:
    if name == "digits":
        return DigitsSource(split)
    if name == "shapes":
        return ShapesSource(split)
    if name in ("imagefolder", "imagenet") and not root:
        raise PipelineError(f"source {name!r} needs a root folder (--root PATH_OR_URL)")
    if name == "imagefolder":
        return FolderSource(str(root))
    if name == "imagenet":
        return ImageNetSource(str(root), split, val_labels, devkit_meta)
    raise PipelineError(f"unknown source {name!r}; known sources: {', '.join(SOURCE_NAMES)}")
