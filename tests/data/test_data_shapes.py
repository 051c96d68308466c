"""The generated `shapes` source: deterministic bytes, exact balance, labels not in trivial statistics, CLI."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import shapes
from pipeline.data.manifest import load_manifest
from pipeline.data.sources import ShapesSource, make_source
from pipeline.errors import PipelineError


def _digest(source: ShapesSource) -> str:
    sha = hashlib.sha256()
    for ref in source.samples():
        sha.update(source.read(ref))
    return sha.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    first = _digest(ShapesSource("train", count=12))
    assert first == _digest(ShapesSource("train", count=12))  # a second, fresh source object
    assert first != _digest(ShapesSource("train", seed=1, count=12))
    # the splits are different images, and each sample is a function of its own index only
    assert _digest(ShapesSource("val", count=12)) != first
    assert shapes.png_bytes(0, "train", 7) == ShapesSource("train", count=12).read(ShapesSource("train").samples()[7])


def test_classes_are_exactly_balanced_and_keys_unique() -> None:
    for split, count in shapes.COUNTS.items():
        refs = make_source("shapes", split=split).samples()
        assert len(refs) == count
        assert Counter(ref.label for ref in refs) == {c: count // 10 for c in range(10)}
        assert len({ref.key for ref in refs}) == count
    assert ShapesSource("train").classes == list(shapes.CLASSES)
    with pytest.raises(PipelineError, match="shapes: unknown split 'test'"):
        make_source("shapes", split="test")


def _trivial_features(pixels: np.ndarray) -> np.ndarray:
    """Per-channel mean and std plus a 4x4 grid of mean intensity: colour, brightness, coarse layout."""
    x = pixels.astype(np.float64) / 255.0
    n, h, w, _ = x.shape
    grid = x.mean(axis=3).reshape(n, 4, h // 4, 4, w // 4).mean(axis=(2, 4)).reshape(n, 16)
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), grid], axis=1)


def _nearest_centroid_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-9
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in range(10)])
    predicted = ((test_x[:, None, :] - centroids[None]) ** 2).sum(axis=2).argmin(axis=1)
    return float((predicted == test_y).mean())


def test_label_is_not_in_trivial_pixel_statistics() -> None:
    train_x, train_y = shapes.images(shapes.SEED, "train", 600)
    val_x, val_y = shapes.images(shapes.SEED, "val", 300)
    accuracy = _nearest_centroid_top1(_trivial_features(train_x), train_y, _trivial_features(val_x), val_y)
    # chance is 10%; with 300 queries its binomial std is 1.7 points, so 20% is > 5 std above chance
    assert accuracy < 0.20, f"shapes: colour/intensity statistics predict the label ({accuracy:.1%})"


def test_the_trivial_baseline_finds_labels_where_pixels_carry_them() -> None:
    """The same baseline on digits (a class is a pixel layout there) is far above chance: the check above can fail."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.repeat((digits.images * 255 / 16)[..., None], 3, axis=3)
    train_x, test_x, train_y, test_y = train_test_split(pixels, digits.target, test_size=300, random_state=0,
                                                        stratify=digits.target)
    accuracy = _nearest_centroid_top1(_trivial_features(train_x), train_y, _trivial_features(test_x), test_y)
    assert accuracy > 0.5, accuracy


def test_cli_writes_a_manifest_that_verify_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    dest = tmp_path / "shapes"
    assert main(["shards", "shapes", str(dest), "--split", "val", "--shard-max-count", "400", "--no-ray",
                 "--no-progress"]) == 0
    manifest = load_manifest(str(dest / "val.manifest.json"))
    assert (manifest.num_samples, len(manifest.shards), manifest.classes) == (1000, 3, list(shapes.CLASSES))
    assert manifest.source["name"] == "shapes" and manifest.source["generator_seed"] == shapes.SEED
    capsys.readouterr()
    assert main(["shards", "verify", str(dest / "val.manifest.json"), "--decode"]) == 0
    assert "ok, 3 shards, 1000 samples" in capsys.readouterr().out
