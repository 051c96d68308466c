"""Issue 12, item 1: a shard whose bytes rotted is rewritten on the next build, never reused."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest

from pipeline.data.verify import check_manifest, verify_manifest
from pipeline.data.writer import write_shards
from pipeline.errors import PipelineError

BUILD = dict(split="train", shard_max_count=200, workers=0, progress=False)  # 1437 digits -> 8 shards


def rot_png(shard: bytes, nbytes: int = 64) -> tuple[bytes, str]:
    """The shard with `nbytes` overwritten inside its first PNG (tar framing intact), and that sample's key."""
    data = bytearray(shard)
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    assert member.size > 41 + nbytes, member.size
    start = member.offset_data + 41  # past the PNG signature and IHDR: inside IDAT
    data[start : start + nbytes] = b"\xff" * nbytes
    return bytes(data), member.name.split(".", 1)[0]


def overwrite_inside_png(shard: Path, nbytes: int = 64) -> str:
    """rot_png on a local shard file; returns the damaged sample's key."""
    data, key = rot_png(shard.read_bytes(), nbytes)
    shard.write_bytes(data)
    return key


def test_rotted_shard_is_rewritten_named_and_the_digest_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = write_shards("digits", str(tmp_path), **BUILD)
    assert (first.written, first.reused) == (8, 0)
    shard = tmp_path / "train-000003.tar"
    original = shard.read_bytes()
    key = overwrite_inside_png(shard)
    assert shard.stat().st_size == len(original) and shard.read_bytes() != original
    with pytest.raises(PipelineError, match=r"train-000003\.tar: sha256"):  # the damage is real
        verify_manifest(first.manifest_url)
    decoded = check_manifest(first.manifest_url, decode=True)
    assert {(Path(p.url).name, p.key) for p in decoded.problems if p.key} == {("train-000003.tar", key)}

    with caplog.at_level(logging.INFO, logger="pipeline.data.writer"):
        again = write_shards("digits", str(tmp_path), **BUILD)
    assert (again.written, again.reused) == (1, 7)
    assert [name for name, _ in again.rewritten] == ["train-000003.tar"]
    assert "sha256" in again.rewritten[0][1]
    assert any("train-000003.tar" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    assert again.manifest.digest == first.manifest.digest
    assert shard.read_bytes() == original
    assert verify_manifest(again.manifest_url).samples == 1437


def test_a_missing_shard_is_rebuilt_byte_identical(tmp_path: Path) -> None:
    first = write_shards("digits", str(tmp_path), **BUILD)
    shard = tmp_path / "train-000005.tar"
    original = shard.read_bytes()
    shard.unlink()
    again = write_shards("digits", str(tmp_path), **BUILD)
    assert again.rewritten == [("train-000005.tar", "listed in the manifest but missing")]
    assert shard.read_bytes() == original and again.manifest.digest == first.manifest.digest


def test_cli_names_the_rewritten_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    args = ["shards", "digits", str(tmp_path), "--no-ray", "--no-progress", "--shard-max-count", "200"]
    assert main(args) == 0
    capsys.readouterr()
    overwrite_inside_png(tmp_path / "train-000006.tar")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(1 written, 7 reused)" in out
    assert "rewrote train-000006.tar: sha256" in out


def test_an_unrepairable_shard_is_left_as_it_was(imagefolder_root: Path, tmp_path: Path) -> None:
    """If the source's bytes changed in place (same size, so the same plan), a rebuild cannot match the
    manifest: the build fails naming the shard and does not put other bytes under the manifest's name."""
    import shutil

    root = tmp_path / "src"
    shutil.copytree(imagefolder_root, root)
    dest = tmp_path / "out"
    first = write_shards("imagefolder", str(dest), root=str(root), shard_max_count=30, workers=0, progress=False)
    assert len(first.manifest.shards) == 1
    image = root / "dog" / "img.3.jpg"
    pixels = bytearray(image.read_bytes())
    pixels[-40:-2] = bytes(reversed(pixels[-40:-2]))  # same size, other bytes
    image.write_bytes(bytes(pixels))
    shard = dest / "train-000000.tar"
    damaged = bytearray(shard.read_bytes())
    damaged[1000] ^= 0x01
    shard.write_bytes(bytes(damaged))

    with pytest.raises(PipelineError, match=r"train-000000\.tar: rebuilt shard has sha256 .* its manifest says"):
        write_shards("imagefolder", str(dest), root=str(root), shard_max_count=30, workers=0, progress=False)
    assert shard.read_bytes() == bytes(damaged)
    assert not list(dest.glob("*.tmp-*"))
