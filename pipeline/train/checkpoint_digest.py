"""A digest per checkpoint tag: every file of the tag with its size and sha256, written last.

    <dir>/<tag>/digest.json   {"format": 1, "tag": "step00000200",
                               "files": {"mp_rank_00_model_states.pt": {"size": ..., "sha256": ...}, ...}}

It lives inside the tag folder, so every copy of a tag (Ray's reported folders are hard links of it)
carries its own digest. It is written atomically (tmp file + fsync + rename) after every rank's files
of the tag are complete and before `latest` moves, so a tag whose digest exists was finished; a tag
without one is either torn or from before digests existed (pipeline.train.checkpoint decides which).

Files are hashed while they are written (HashingWriter, the bytes pass through once), not read back.
Verification reads every byte again; hashlib releases the GIL, so ranks can share the work.
The digest detects corruption (flipped bits, truncation, missing files); it is no defence against
someone who can also rewrite digest.json: that is what weights-only loading is for
(pipeline.train.checkpoint_io).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

DIGEST_FILE = "digest.json"
FORMAT = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


class DigestError(Exception):
    """digest.json exists but cannot be read as a digest (the message names the file and why)."""


class HashingWriter:
    """A binary file wrapper for torch.save: every byte written also goes into a sha256.

    torch.save writes a zip archive sequentially through `write` (no seek), so the running hash is
    the hash of the file. The first OSError of a write is kept in `error` (torch's zip writer turns it
    into a RuntimeError that no longer carries the errno)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes | memoryview) -> int:
        try:
            written = self.raw.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.hash.update(data)
        self.size += len(data) if isinstance(data, bytes) else memoryview(data).nbytes
        return written

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as err:
            self.error = self.error or err
            raise

    def digest(self) -> FileDigest:
        return FileDigest(self.size, self.hash.hexdigest())


def hash_file(path: str | os.PathLike) -> FileDigest:
    """Size and sha256 of a file (read in 1 MiB chunks; hashlib.file_digest needs Python 3.11)."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return FileDigest(size, digest.hexdigest())


def write_digest(tag_dir: str | os.PathLike, tag: str, files: Mapping[str, FileDigest]) -> str:
    """Write `<tag_dir>/digest.json` atomically; returns its path."""
    path = Path(tag_dir) / DIGEST_FILE
    body = {
        "format": FORMAT,
        "tag": tag,
        "files": {name: {"size": d.size, "sha256": d.sha256} for name, d in sorted(files.items())},
    }
    tmp = path.with_name(f".{DIGEST_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return str(path)


def read_digest(tag_dir: str | os.PathLike) -> dict[str, FileDigest] | None:
    """The files a tag's digest lists, or None when the tag has no digest.json."""
    path = Path(tag_dir) / DIGEST_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DigestError(f"{path}: unreadable ({err.strerror or err})") from None
    try:
        body = json.loads(text)
        if body.get("format") != FORMAT:
            raise DigestError(f"{path}: format {body.get('format')!r}, this pipeline reads format {FORMAT}")
        files = {str(name): FileDigest(int(v["size"]), str(v["sha256"])) for name, v in body["files"].items()}
    except DigestError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DigestError(f"{path}: not a checkpoint digest ({type(err).__name__}: {err})") from None
    if not files:
        raise DigestError(f"{path}: lists no files")
    return files


def check_file(tag_dir: str | os.PathLike, name: str, expected: FileDigest) -> str | None:
    """None when `<tag_dir>/<name>` has the expected size and sha256, else what differs (one phrase
    naming the file, the expected and the actual value). The size is checked first: a truncated
    file is named without reading it."""
    path = Path(tag_dir) / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{name}: missing (digest lists {expected.size} bytes)"
    if size != expected.size:
        return f"{name}: {size} bytes, digest says {expected.size}"
    try:
        actual = hash_file(path)
    except OSError as err:
        return f"{name}: unreadable ({err.strerror or err})"
    if actual.sha256 != expected.sha256:
        return f"{name}: sha256 {actual.sha256[:16]}..., digest says {expected.sha256[:16]}..."
    return None


def tag_size(tag_dir: str | os.PathLike) -> int | None:
    """Bytes of the tag's files according to its digest (None without a readable digest)."""
    try:
        files = read_digest(tag_dir)
    except DigestError:
        return None
    return sum(d.size for d in files.values()) if files else None
