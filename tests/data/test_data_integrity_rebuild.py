"""Issue 12, item 1: a shard whose bytes rotted is rewritten on the next build, never reused."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest

from pipeline.data.verify import verify_manifest
from pipeline.data.writer import write_shards
from pipeline.errors import PipelineError

BUILD = dict(split="train", shard_max_count=200, workers=0, progress=False)  # 1437 digits -> 8 shards


def overwrite_inside_png(shard: Path, nbytes: int = 64) -> str:
    """Overwrite `nbytes` in the middle of the shard's first PNG (tar framing intact); returns its key."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    assert member.size > 41 + nbytes, member.size
    start = member.offset_data + 41  # past the PNG signature and IHDR: inside IDAT
    data[start : start + nbytes] = b"\xff" * nbytes
    shard.write_bytes(bytes(data))
    return member.name.split(".", 1)[0]


def test_rotted_shard_is_rewritten_named_and_the_digest_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = write_shards("digits", str(tmp_path), **BUILD)
    assert (first.written, first.reused) == (8, 0)
    shard = tmp_path / "train-000003.tar"
    original = shard.read_bytes()
    overwrite_inside_png(shard)
    assert shard.stat().st_size == len(original) and shard.read_bytes() != original
    with pytest.raises(PipelineError, match=r"train-000003\.tar: sha256"):  # the damage is real
        verify_manifest(first.manifest_url)

    with caplog.at_level(logging.INFO, logger="pipeline.data.writer"):
        again = write_shards("digits", str(tmp_path), **BUILD)
    assert (again.written, again.reused) == (1, 7)
    assert [name for name, _ in again.rewritten] == ["train-000003.tar"]
    assert "sha256" in again.rewritten[0][1]
    assert any("train-000003.tar" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    assert again.manifest.digest == first.manifest.digest
    assert shard.read_bytes() == original
    assert verify_manifest(again.manifest_url).samples == 1437
