"""The per-tag digest on plain files (no DeepSpeed): hashing while torch.save writes, reading, checking,
and a digest.json that is itself damaged (the tag is refused, naming it)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.train import checkpoint as ckpt
from pipeline.train.checkpoint_digest import (
    DIGEST_FILE,
    DigestError,
    FileDigest,
    HashingWriter,
    check_file,
    hash_file,
    read_digest,
    tag_size,
    write_digest,
)
from pipeline.train.checkpoint_verify import select


def test_hashing_while_torch_saves_equals_hashing_the_file(tmp_path):
    path = tmp_path / "state.pt"
    with open(path, "wb") as raw:
        writer = HashingWriter(raw)
        torch.save({"w": torch.arange(10_000, dtype=torch.float32), "step": 3}, writer)
    assert writer.digest() == hash_file(path) and writer.size == path.stat().st_size


def test_check_file_names_what_differs(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"x" * 100)
    good = hash_file(tmp_path / "a.pt")
    assert check_file(tmp_path, "a.pt", good) is None
    assert check_file(tmp_path, "b.pt", good) == "b.pt: missing (digest lists 100 bytes)"
    assert check_file(tmp_path, "a.pt", FileDigest(99, good.sha256)) == "a.pt: 100 bytes, digest says 99"
    problem = check_file(tmp_path, "a.pt", FileDigest(100, "0" * 64))
    assert problem == f"a.pt: sha256 {good.sha256[:16]}..., digest says 0000000000000000..."


def test_write_read_and_size(tmp_path):
    files = {"a.pt": FileDigest(3, "ab" * 32), "b.pt": FileDigest(5, "cd" * 32)}
    write_digest(tmp_path, "step00000001", files)
    assert read_digest(tmp_path) == files and tag_size(tmp_path) == 8
    assert [p.name for p in tmp_path.iterdir()] == [DIGEST_FILE]  # no temp file left
    assert read_digest(tmp_path / "absent") is None


@pytest.mark.parametrize("body, reason", [
    ("{not json", "not a checkpoint digest"),
    (json.dumps({"format": 99, "files": {}}), "format 99"),
    (json.dumps({"format": 1, "files": {}}), "lists no files"),
    (json.dumps({"format": 1, "files": {"a.pt": {"size": 1}}}), "not a checkpoint digest (KeyError"),
])
def test_a_damaged_digest_is_named(tmp_path, body, reason):
    (tmp_path / DIGEST_FILE).write_text(body)
    with pytest.raises(DigestError, match=re.escape(reason)):
        read_digest(tmp_path)


def test_a_tag_with_a_damaged_digest_is_refused_naming_it(tmp_path):
    tag = tmp_path / ckpt.tag_for_step(4)
    tag.mkdir()
    (tag / DIGEST_FILE).write_text("{")
    ckpt.publish_latest(tmp_path, tag.name)
    with pytest.raises(PipelineError, match=re.escape(f"{tag}: {tag / DIGEST_FILE}: not a checkpoint digest")):
        select([str(tmp_path)])


def test_latest_naming_a_missing_tag_falls_back_to_an_older_one(tmp_path):
    older = tmp_path / ckpt.tag_for_step(2)
    older.mkdir()
    (older / "note.txt").write_text("x")
    write_digest(older, older.name, {"note.txt": hash_file(older / "note.txt")})
    (tmp_path / "latest").write_text(ckpt.tag_for_step(4))
    selection = select([str(tmp_path)])
    assert selection.tag == older.name
    assert selection.rejected == [f"{tmp_path / ckpt.tag_for_step(4)}: named by {tmp_path / 'latest'} but missing"]
