"""Issue 12, item 2: a written shard set is never changed in place; other builds are refused or versioned."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.data import publish
from pipeline.data.identity import build_fingerprint, default_build_dest
from pipeline.data.manifest import load_manifest
from pipeline.data.verify import verify_manifest
from pipeline.data.writer import claim_name, write_shards
from pipeline.errors import PipelineError

from .images import make_jpeg

VAL = dict(split="val", shard_max_count=100, workers=0, progress=False)  # 360 digits -> 4 shards


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


def test_another_seed_is_refused_naming_both_builds(tmp_path: Path) -> None:
    first = write_shards("digits", str(tmp_path), seed=0, **VAL)
    before = snapshot(tmp_path)
    with pytest.raises(PipelineError) as caught:
        write_shards("digits", str(tmp_path), seed=1, **VAL)
    message = str(caught.value)
    assert "\n" not in message and "refused" in message
    assert first.manifest.digest[:12] in message and first.fingerprint[:12] in message
    assert build_fingerprint("digits", seed=1, shard_max_count=100, split="val")[:12] in message
    assert "seed 0 -> 1" in message and "--new-version" in message
    assert snapshot(tmp_path) == before  # not one byte, not one mtime changed

    # control: the same build is not refused, and reuses every shard
    again = write_shards("digits", str(tmp_path), seed=0, **VAL)
    assert (again.written, again.reused) == (0, 4) and snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(shard_max_count=120), "shard_max_count 100 -> 120"),
        (dict(max_side=16), "encoding 'original' -> 'max_side=16,jpeg_quality=90'"),
    ],
)
def test_other_settings_are_refused(tmp_path: Path, change: dict, expected: str) -> None:
    write_shards("digits", str(tmp_path), **VAL)
    before = snapshot(tmp_path)
    with pytest.raises(PipelineError, match="refused") as caught:
        write_shards("digits", str(tmp_path), **{**VAL, **change})
    assert expected in str(caught.value)
    assert snapshot(tmp_path) == before


def test_other_source_and_changed_source_files_are_refused(imagefolder_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "src"
    shutil.copytree(imagefolder_root, root)
    dest = tmp_path / "out"
    write_shards("imagefolder", str(dest), root=str(root), split="val", workers=0, progress=False)
    before = snapshot(dest)
    with pytest.raises(PipelineError, match="source 'imagefolder' -> 'digits'"):
        write_shards("digits", str(dest), **VAL)

    import random

    (root / "fox" / "new.jpg").write_bytes(make_jpeg(random.Random(5)))  # same settings, one more image
    with pytest.raises(PipelineError, match="same settings, but the source's samples changed"):
        write_shards("imagefolder", str(dest), root=str(root), split="val", workers=0, progress=False)
    assert snapshot(dest) == before


def test_new_version_goes_to_its_own_folder_and_is_reused(tmp_path: Path) -> None:
    original = write_shards("digits", str(tmp_path), seed=0, **VAL)
    before = snapshot(tmp_path)
    other = write_shards("digits", str(tmp_path), seed=1, new_version=True, **VAL)
    version = tmp_path / f"v-{other.plan[:12]}"
    assert other.manifest_url == f"{version}/val.manifest.json"
    assert other.written == 4 and other.manifest.digest != original.manifest.digest
    assert verify_manifest(other.manifest_url).samples == 360
    assert snapshot(tmp_path) == before  # the original set is untouched

    again = write_shards("digits", str(tmp_path), seed=1, new_version=True, **VAL)
    assert (again.manifest_url, again.written, again.reused) == (other.manifest_url, 0, 4)
    # new_version with the build that is already at dest: nothing new, the original is reused
    same = write_shards("digits", str(tmp_path), seed=0, new_version=True, **VAL)
    assert same.manifest_url == original.manifest_url and same.written == 0


def test_an_older_manifest_without_a_plan_is_not_taken_over(tmp_path: Path) -> None:
    first = write_shards("digits", str(tmp_path), **VAL)
    manifest_path = tmp_path / "val.manifest.json"
    raw = json.loads(manifest_path.read_text())
    for key in ("fingerprint", "plan", "build"):
        del raw["writer"][key]
    manifest_path.write_text(json.dumps(raw))  # as the writer before issue 12 wrote it
    assert load_manifest(str(manifest_path)).digest == first.manifest.digest
    with pytest.raises(PipelineError, match="written by an older writer"):
        write_shards("digits", str(tmp_path), **VAL)


def test_a_claim_of_another_build_blocks_the_folder(tmp_path: Path) -> None:
    """A build that died before its manifest leaves its claim: other builds must not mix into its shards."""
    claim = tmp_path / claim_name("val")
    publish.create_exclusive(str(claim), json.dumps({"plan": "0" * 64, "fingerprint": "1" * 64}).encode())
    assert not publish.create_exclusive(str(claim), b"{}")  # exclusive: a second create is refused
    with pytest.raises(PipelineError, match=r"val\.building\.json: an unfinished build 111111111111"):
        write_shards("digits", str(tmp_path), **VAL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [claim.name]

    claim.unlink()  # control: without the claim the same call builds
    report = write_shards("digits", str(tmp_path), **VAL)
    assert report.written == 4 and not claim.exists()


def test_a_claim_of_the_same_build_is_taken_over(tmp_path: Path) -> None:
    """The same build re-run after a crash proceeds, rebuilds the unvouched shards, then drops the claim."""
    reference = write_shards("digits", str(tmp_path / "ref"), **VAL)
    dest = tmp_path / "crashed"
    dest.mkdir()
    record = {"plan": reference.plan, "fingerprint": reference.fingerprint}
    publish.create_exclusive(str(dest / claim_name("val")), json.dumps(record).encode())
    (dest / "val-000000.tar").write_bytes(b"half")  # what an older, non-atomic writer could have left
    report = write_shards("digits", str(dest), **VAL)
    assert report.written == 4 and report.manifest.digest == reference.manifest.digest
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())


def test_default_build_dest_is_named_by_the_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "outputs")
    dest = default_build_dest(out, "digits", seed=0, shard_max_count=100)
    assert dest == f"{out}/shards/digits-{build_fingerprint('digits', seed=0, shard_max_count=100)[:12]}"
    others = {
        default_build_dest(out, "digits", seed=1, shard_max_count=100),
        default_build_dest(out, "digits", seed=0, shard_max_count=200),
        default_build_dest(out, "digits", seed=0, shard_max_count=100, options={"max_side": 16}),
        default_build_dest(out, "imagefolder", root="/data/a", seed=0, shard_max_count=100),
        default_build_dest(out, "imagefolder", root="/data/b", seed=0, shard_max_count=100),
    }
    assert len(others) == 5 and dest not in others
    # defaults spelled out, and a relative root, name the same build
    assert default_build_dest(out, "digits", seed=0, shard_max_count=100, options={"jpeg_quality": 90}) == dest
    monkeypatch.chdir(tmp_path)
    assert default_build_dest(out, "imagefolder", root="data", shard_max_count=100) == default_build_dest(
        out, "imagefolder", root=str(tmp_path / "data"), shard_max_count=100
    )
    with pytest.raises(PipelineError, match="unknown option 'max_sid'"):
        default_build_dest(out, "digits", options={"max_sid": 16})

    # one folder holds both splits; each manifest records its split's fingerprint
    train = write_shards("digits", dest, split="train", shard_max_count=100, workers=0, progress=False)
    val = write_shards("digits", dest, split="val", shard_max_count=100, workers=0, progress=False)
    assert {os.path.dirname(train.manifest_url), os.path.dirname(val.manifest_url)} == {dest}
    assert train.fingerprint == build_fingerprint("digits", shard_max_count=100, split="train")
    assert load_manifest(val.manifest_url).writer["fingerprint"] == val.fingerprint != train.fingerprint


def test_s3_manifest_is_write_once_and_another_seed_refused(s3_endpoint: str) -> None:
    import s3fs

    dest = "s3://shards/immutable-digits"
    first = write_shards("digits", dest, **VAL)
    fs = s3fs.S3FileSystem()
    before = {p: fs.info(p)["ETag"] for p in fs.ls(dest.removeprefix("s3://"))}
    with pytest.raises(PipelineError, match="refused.*seed 0 -> 1"):
        write_shards("digits", dest, seed=1, **VAL)
    assert {p: fs.info(p)["ETag"] for p in fs.ls(dest.removeprefix("s3://"), refresh=True)} == before
    assert not publish.create_exclusive(first.manifest_url, b"{}")  # If-None-Match: the object stays
    assert load_manifest(first.manifest_url).digest == first.manifest.digest
    s3fs.S3FileSystem.clear_instance_cache()
