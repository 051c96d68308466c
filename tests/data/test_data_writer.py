"""Shard writing: sources, manifest contents, idempotent re-runs, verify, atomic writes, memory:// and s3://."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import fsspec
import pytest

from pipeline.data.fsutil import atomic_writer
from pipeline.data.manifest import load_manifest, manifest_digest
from pipeline.data.sources import digits_split_indices
from pipeline.data.verify import verify_manifest
from pipeline.data.writer import write_shards
from pipeline.errors import PipelineError

from .images import CLASSES, WNIDS, build_imagenet


def tar_members(path: str | Path) -> list[tuple[str, bytes]]:
    with fsspec.open(str(path), "rb") as fh, tarfile.open(fileobj=io.BytesIO(fh.read())) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples_of(manifest_url: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard of a manifest."""
    manifest = load_manifest(manifest_url)
    samples: dict[str, dict[str, bytes]] = {}
    for url in manifest.shard_urls():
        for name, data in tar_members(url):
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    return samples


def test_digits_manifest_and_shards(tmp_path: Path) -> None:
    report = write_shards("digits", str(tmp_path), split="train", shard_max_count=400, workers=0, progress=False)
    manifest = load_manifest(report.manifest_url)
    assert report.manifest_url == f"{tmp_path}/train.manifest.json"
    assert manifest.num_samples == len(digits_split_indices("train")) == 1437
    assert manifest.classes == [str(i) for i in range(10)]
    assert [s.url for s in manifest.shards] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s.samples for s in manifest.shards] == [400, 400, 400, 237]
    assert manifest.source["name"] == "digits" and manifest.split == "train" and manifest.tool_version
    for entry, url in zip(manifest.shards, manifest.shard_urls(), strict=True):
        data = Path(url).read_bytes()
        assert len(data) == entry.bytes and hashlib.sha256(data).hexdigest() == entry.sha256
    assert manifest.digest == manifest_digest(manifest) == report.manifest.digest

    samples = samples_of(report.manifest_url)
    assert len(samples) == 1437 and all("." not in key for key in samples)
    labels = [int(s["cls"]) for s in samples.values()]
    assert sorted(set(labels)) == list(range(10))
    assert all(set(s) == {"cls", "png", "json"} for s in samples.values())
    from PIL import Image

    first = next(iter(samples.values()))
    assert Image.open(io.BytesIO(first["png"])).size == (32, 32)
    # shards are shuffled across classes, not class-sorted
    first_shard_labels = {int(data) for name, data in tar_members(manifest.shard_urls()[0]) if name.endswith(".cls")}
    assert len(first_shard_labels) == 10

    val = write_shards("digits", str(tmp_path), split="val", workers=0, progress=False)
    assert val.manifest.num_samples == 360
    assert not set(samples) & set(samples_of(val.manifest_url))


def test_rerun_reuses_shards_and_rewrites_a_damaged_one(tmp_path: Path) -> None:
    first = write_shards("digits", str(tmp_path), split="val", shard_max_count=100, workers=0, progress=False)
    shard_paths = [Path(u) for u in first.manifest.shard_urls()]
    mtimes = [p.stat().st_mtime_ns for p in shard_paths]

    again = write_shards("digits", str(tmp_path), split="val", shard_max_count=100, workers=0, progress=False)
    assert (again.written, again.reused) == (0, 4)
    assert again.manifest.digest == first.manifest.digest
    assert [p.stat().st_mtime_ns for p in shard_paths] == mtimes

    damaged = shard_paths[2]
    damaged.write_bytes(damaged.read_bytes()[:5000])  # as if an older tool left a partial file
    repaired = write_shards("digits", str(tmp_path), split="val", shard_max_count=100, workers=0, progress=False)
    assert (repaired.written, repaired.reused) == (1, 3)
    assert repaired.manifest.digest == first.manifest.digest  # byte-identical rewrite
    assert not list(tmp_path.glob("*.tmp-*"))


def test_verify_passes_then_reports_a_tampered_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    report = write_shards("digits", str(tmp_path), split="val", shard_max_count=150, workers=0, progress=False)
    assert main(["shards", "verify", report.manifest_url]) == 0
    assert "ok, 3 shards, 360 samples" in capsys.readouterr().out
    result = verify_manifest(report.manifest_url)
    assert (result.shards, result.samples) == (3, 360)

    shard = tmp_path / "val-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"val-000001\.tar: sha256 .* != manifest"):
        verify_manifest(report.manifest_url)
    assert main(["shards", "verify", report.manifest_url]) == 2
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith(("bad:", "error:"))]  # progress aside
    assert len(problems) == 1 and "val-000001.tar" in problems[0], err

    (tmp_path / "val-000002.tar").unlink()
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"val-000002\.tar: shard listed in the manifest is missing"):
        verify_manifest(report.manifest_url)


def test_imagefolder_keeps_jpeg_bytes_and_records_corrupt_files(
    imagefolder_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import main

    dest = tmp_path / "out"
    code = main(
        [
            "shards",
            "imagefolder",
            str(dest),
            "--root",
            str(imagefolder_root),
            "--no-ray",
            "--shard-max-count",
            "5",
            "--split",
            "train",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "20 samples" in out and "1 skipped" in out and "skipped cat/broken.jpg" in out

    manifest = load_manifest(str(dest / "train.manifest.json"))
    assert manifest.classes == CLASSES
    assert manifest.num_samples == 20 and len(manifest.shards) == 5  # 21 planned, the corrupt one skipped
    assert [(s.file, "truncated" in s.reason.lower()) for s in manifest.skipped] == [("cat/broken.jpg", True)]

    samples = samples_of(str(dest / "train.manifest.json"))
    assert samples["cat/img_0"]["jpg"] == (imagefolder_root / "cat" / "img.0.jpg").read_bytes()
    assert samples["dog/drawing"]["png"] == (imagefolder_root / "dog" / "drawing.png").read_bytes()
    assert int(samples["fox/gray"]["cls"]) == 2 and "jpg" in samples["fox/gray"]
    meta = json.loads(samples["dog/img_3"]["json"])
    assert meta["file"] == "dog/img.3.jpg" and meta["encoding"] == "original" and meta["width"] >= 24
    assert int(samples["dog/img_3"]["cls"]) == 1


def test_max_side_reencodes_large_images(imagefolder_root: Path, tmp_path: Path) -> None:
    report = write_shards(
        "imagefolder",
        str(tmp_path),
        root=str(imagefolder_root),
        max_side=16,
        jpeg_quality=70,
        workers=0,
        progress=False,
    )
    from PIL import Image

    for sample in samples_of(report.manifest_url).values():
        ext = "jpg" if "jpg" in sample else "png"
        assert max(Image.open(io.BytesIO(sample[ext])).size) <= 16
        assert json.loads(sample["json"])["encoding"] == "max_side=16,jpeg_quality=70"


@pytest.mark.parametrize("layout", ["folders", "loc_csv", "devkit"])
def test_imagenet_labels_follow_sorted_wnids(tmp_path: Path, layout: str) -> None:
    root = build_imagenet(tmp_path / "ilsvrc", layout)
    train = write_shards("imagenet", str(tmp_path / "out"), root=str(root), split="train", workers=0, progress=False)
    val = write_shards("imagenet", str(tmp_path / "out"), root=str(root), split="val", workers=0, progress=False)
    assert train.manifest.classes == val.manifest.classes == sorted(WNIDS)
    assert train.manifest.num_samples == 12 and val.manifest.num_samples == 7
    for key, sample in samples_of(train.manifest_url).items():
        assert WNIDS.index(key.split("/")[0]) == int(sample["cls"])
    val_samples = samples_of(val.manifest_url)
    for key, sample in val_samples.items():
        number = int(key.rsplit("_", 1)[1])
        assert int(sample["cls"]) == (number - 1) % 3  # the builder labels image n with WNIDS[(n-1) % 3]


def test_memory_destination_roundtrip() -> None:
    dest = "memory://shards-test/digits"
    report = write_shards("digits", dest, split="val", shard_max_count=200, workers=4, progress=False)
    assert report.manifest_url == f"{dest}/val.manifest.json"
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("/shards-test/digits", detail=False))
    assert names == ["val-000000.tar", "val-000001.tar", "val.manifest.json"]
    assert verify_manifest(report.manifest_url).samples == 360
    assert load_manifest(report.manifest_url).shard_urls()[0] == f"{dest}/val-000000.tar"


def test_s3_destination_in_process(s3_endpoint: str, imagefolder_root: Path) -> None:
    import s3fs

    dest = "s3://shards/pets"
    report = write_shards("imagefolder", dest, root=str(imagefolder_root), shard_max_count=8, workers=0, progress=False)
    assert verify_manifest(report.manifest_url).samples == 20
    fs = s3fs.S3FileSystem()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("shards/pets")) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "train.manifest.json",
    ]
    again = write_shards("imagefolder", dest, root=str(imagefolder_root), shard_max_count=8, workers=0, progress=False)
    assert again.reused == 3 and again.manifest.digest == report.manifest.digest


def test_ray_tasks_write_the_same_shards(ray_local: None, tmp_path: Path) -> None:
    """Ray tasks (one per group of shards) write byte-identical shards to in-process writing, on s3 too."""
    local = write_shards("digits", str(tmp_path / "a"), split="val", shard_max_count=50, workers=0, progress=False)
    ray_written = write_shards(
        "digits", "s3://shards/digits-ray", split="val", shard_max_count=50, shards_per_task=3, progress=False
    )
    assert ray_written.written == 8
    assert ray_written.manifest.digest == local.manifest.digest
    assert verify_manifest(ray_written.manifest_url).samples == 360


def test_atomic_writer_leaves_nothing_on_failure(tmp_path: Path, s3_endpoint: str) -> None:
    import s3fs

    for url in (str(tmp_path / "x.tar"), "memory://atomic/x.tar", "s3://shards/atomic/x.tar"):
        with pytest.raises(RuntimeError, match="boom"), atomic_writer(url) as out:
            out.write(b"partial")
            raise RuntimeError("boom")
        fs, path = fsspec.core.url_to_fs(url)
        parent = path.rsplit("/", 1)[0]
        assert not fs.exists(path)
        assert not (fs.exists(parent) and fs.ls(parent)), f"left behind in {url}: {fs.ls(parent)}"
        with atomic_writer(url) as out:
            out.write(b"complete")
        assert fs.cat_file(path) == b"complete" and out.sha256.hexdigest() == hashlib.sha256(b"complete").hexdigest()
    s3fs.S3FileSystem.clear_instance_cache()
