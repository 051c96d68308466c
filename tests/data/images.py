"""Generated image trees for the data tests: small random JPEGs/PNGs, a corrupt file, ImageNet layouts."""

from __future__ import annotations

import io
import random
from pathlib import Path

CLASSES = ["cat", "dog", "fox"]
WNIDS = ["n01440764", "n01443537", "n01484850"]


def make_jpeg(rng: random.Random, size: tuple[int, int] | None = None, mode: str = "RGB") -> bytes:
    """A small random-colour JPEG (smooth blocks, so it compresses like a photo, not like noise)."""
    from PIL import Image

    width, height = size or (rng.randint(24, 48), rng.randint(24, 48))
    image = Image.new(mode, (4, 4))
    image.putdata([tuple(rng.randrange(256) for _ in mode) if len(mode) > 1 else rng.randrange(256) for _ in range(16)])
    buffer = io.BytesIO()
    image.resize((width, height), Image.BILINEAR).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def make_png(rng: random.Random) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (20, 30), (rng.randrange(256), 10, 20, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def build_imagefolder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """ROOT/<class>/*.jpg for CLASSES, plus one PNG, one grayscale JPEG and one corrupt (truncated) JPEG."""
    rng = random.Random(seed)
    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"img.{i}.jpg").write_bytes(make_jpeg(rng))  # dots in names: keys must not keep them
    (root / "dog" / "drawing.png").write_bytes(make_png(rng))
    (root / "fox" / "gray.jpeg").write_bytes(make_jpeg(rng, mode="L"))
    (root / "cat" / "broken.jpg").write_bytes(make_jpeg(rng, (64, 64))[:300])
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def build_imagenet(root: Path, val_layout: str, per_class: int = 4, seed: int = 1) -> Path:
    """ROOT/train/<wnid>/*.JPEG and ROOT/val as class folders, or flat with a label file.

    val_layout: "folders", "loc_csv" (LOC_val_solution.csv) or "devkit" (ground truth + meta.mat).
    The wnids are written to the devkit in a non-sorted ILSVRC2012_ID order on purpose.
    """
    rng = random.Random(seed)
    for wnid in WNIDS:
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(make_jpeg(rng))
    val = root / "val"
    val.mkdir(parents=True)
    truth = [WNIDS[i % len(WNIDS)] for i in range(7)]
    for number, wnid in enumerate(truth, start=1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        target = val / wnid / name if val_layout == "folders" else val / name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(make_jpeg(rng))
    if val_layout == "loc_csv":
        rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 3 4" for n, w in enumerate(truth, start=1)]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    elif val_layout == "devkit":
        import numpy as np
        import scipy.io

        ilsvrc_id = {WNIDS[2]: 1, WNIDS[0]: 2, WNIDS[1]: 3}  # ids not in sorted-wnid order
        dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        synsets = np.array(
            [(ilsvrc_id[w], w, f"class {w}", 0) for w in WNIDS] + [(1001, "n00000001", "parent", 3)],
            dtype=dtype,
        )
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        scipy.io.savemat(str(data / "meta.mat"), {"synsets": synsets})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ilsvrc_id[w]}\n" for w in truth))
    return root
