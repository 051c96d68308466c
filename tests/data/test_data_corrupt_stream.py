"""Corrupt data while streaming: "raise" names shard and key; "skip" counts and keeps batch counts."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.data.manifest import load_manifest
from pipeline.data.stream import build_loader
from pipeline.data.writer import write_shards
from pipeline.errors import PipelineError

from .images import build_imagefolder

torch.set_num_threads(1)


def shard_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))


def break_image(path: Path, key: str) -> None:
    """Rewrite the tar with `key`'s image bytes replaced by garbage (everything else unchanged)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name.startswith(key + ".") and member.name.endswith((".jpg", ".png")):
                data = b"definitely not an image"
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def truncate_inside(path: Path, key: str) -> None:
    """Cut the tar in the middle of `key`'s image data, as an interrupted copy would."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(key + ".") and m.name.endswith((".jpg", ".png")))
    with open(path, "r+b") as fh:
        fh.truncate(member.offset_data + member.size // 2)


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 images (3 classes) in 4 shards of 5, no corrupt input."""
    root = build_imagefolder(tmp_path_factory.mktemp("tree"))
    (root / "cat" / "broken.jpg").unlink()
    dest = tmp_path_factory.mktemp("clean-shards")
    write_shards("imagefolder", str(dest), root=str(root), shard_max_count=5, workers=0, progress=False)
    return dest


@pytest.fixture
def damaged(clean_shards: Path, tmp_path: Path) -> dict[str, object]:
    """A copy where shard 1 has one undecodable image and shard 2 is truncated inside its 3rd sample."""
    dest = tmp_path / "shards"
    shutil.copytree(clean_shards, dest)
    bad_key = shard_keys(dest / "train-000001.tar")[1]
    cut_key = shard_keys(dest / "train-000002.tar")[2]
    last_good = shard_keys(dest / "train-000002.tar")[1]
    break_image(dest / "train-000001.tar", bad_key)
    truncate_inside(dest / "train-000002.tar", cut_key)
    return {"url": str(dest / "train.manifest.json"), "dir": dest, "clean": clean_shards, "bad_key": bad_key,
            "last_good": last_good}


def eval_loader(url: str, **kwargs):
    options = dict(batch_size=4, img_size=32, num_workers=0, with_keys=True)
    options.update(kwargs)
    return build_loader(url, "eval", **options)


def test_raise_names_shard_and_key_for_an_undecodable_image(damaged: dict) -> None:
    with pytest.raises(PipelineError, match=rf"train-000001\.tar: sample '{damaged['bad_key']}': cannot decode"):
        list(eval_loader(damaged["url"]))
    with pytest.raises(PipelineError, match=rf"train-000001\.tar: sample '{damaged['bad_key']}'"):
        list(eval_loader(damaged["url"], num_workers=2))  # raised in a worker process, re-raised here


def test_raise_names_shard_and_last_key_for_a_truncated_tar(damaged: dict) -> None:
    # shard 1 back to its written bytes (a copy of another shard would now fail its sha256 check first)
    shutil.copy(damaged["clean"] / "train-000001.tar", damaged["dir"] / "train-000001.tar")
    expected = rf"train-000002\.tar: corrupt or truncated shard after sample '{damaged['last_good']}'"
    with pytest.raises(PipelineError, match=expected):
        list(eval_loader(damaged["url"]))


def test_skip_in_eval_pads_lost_samples_and_counts_them(damaged: dict) -> None:
    manifest = load_manifest(damaged["url"])
    assert manifest.num_samples == 20
    loader = eval_loader(damaged["url"], num_workers=2, on_error="skip")
    batches = list(loader)
    assert len(batches) == len(loader) == 6  # 2 workers x ceil(10 / 4), unchanged by the damage
    keys = [k for _, _, batch_keys in batches for k in batch_keys if k]
    labels = torch.cat([labels for _, labels, _ in batches])
    assert len(keys) == len(set(keys)) == 16 == int((labels >= 0).sum())  # 20 - 1 undecodable - 3 truncated
    assert damaged["bad_key"] not in keys
    assert loader.skipped == 4  # counted in the worker processes, read here


def test_skip_in_train_keeps_batch_count_and_resumes_exactly(damaged: dict) -> None:
    options = dict(batch_size=4, img_size=32, num_workers=2, on_error="skip", with_keys=True, seed=5)
    loader = build_loader(damaged["url"], "train", **options)
    full = list(loader)
    assert len(full) == len(loader) == 6  # 2 workers x ceil(20 / (2 * 4))
    assert all(labels.min() >= 0 and labels.numel() == 4 for _, labels, _ in full)
    assert loader.skipped >= 4  # each reader passes over its shards at least once
    assert damaged["bad_key"] not in {k for _, _, keys in full for k in keys}

    resumed = list(build_loader(damaged["url"], "train", start_batch=3, **options))
    assert [keys for _, _, keys in resumed] == [keys for _, _, keys in full[3:]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, full[3:], strict=True))
