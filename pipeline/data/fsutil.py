"""fsspec helpers for the shard writer: resolve URLs, check a destination, write atomically.

Atomic writes never leave a partial object under its final name:
- local and memory filesystems: write `<name>.tmp-<uuid>` beside the target, then rename it;
- object stores (s3, gs, ...): build the object in a local temporary file, then upload it with one
  `put_file`; S3/GCS make an object visible only once its (multipart/resumable) upload completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

RENAME_PROTOCOLS = {"file", "local", "memory"}


def url_to_fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise PipelineError(f"{url}: cannot open this location: {exc}") from None


def protocols(fs: Any) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


def is_process_local(url: str) -> bool:
    """memory:// lives in one process: Ray tasks and DataLoader workers cannot see it."""
    return url.startswith("memory://")


def join_url(base: str, *names: str) -> str:
    """The one URL joiner: works the same for local paths and fsspec URLs (s3://, memory://)."""
    return "/".join([base.rstrip("/"), *names])


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def absolute_url(url: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URLs stay as they are."""
    url = url.removeprefix("file://")
    return url if is_remote(url) else os.path.abspath(url)


def describe_fs_error(exc: BaseException) -> str:
    """One line for an fsspec/botocore error, naming the setting to fix where we know it."""
    name = type(exc).__name__
    if name == "NoCredentialsError":
        return (
            "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE / a credentials file)"
        )
    if name in ("EndpointConnectionError", "ConnectionError", "ClientConnectorError"):
        return f"cannot reach the storage endpoint ({exc}); check AWS_ENDPOINT_URL_S3 / FSSPEC_S3_ENDPOINT_URL"
    return f"{name}: {exc}"


def check_writable(url: str) -> None:
    """Create the folder (local/memory) and write then delete a probe object; PipelineError if that fails."""
    fs, path = url_to_fs(url)
    probe = join_url(path, f".write-probe-{uuid.uuid4().hex}")
    try:
        if protocols(fs) & RENAME_PROTOCOLS:
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as exc:
        raise PipelineError(f"{url}: destination cannot be written: {describe_fs_error(exc)}") from None


class HashingWriter:
    """A write-only file wrapper that counts bytes and computes sha256 on the way through."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


@contextlib.contextmanager
def atomic_writer(url: str) -> Iterator[HashingWriter]:
    """Yield a HashingWriter; the data appears under `url` only when the block finishes without error."""
    fs, path = url_to_fs(url)
    if protocols(fs) & RENAME_PROTOCOLS:
        tmp_path = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with fs.open(tmp_path, "wb") as raw:
                writer = HashingWriter(raw)
                yield writer
            fs.mv(tmp_path, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                if fs.exists(tmp_path):
                    fs.rm_file(tmp_path)
        return
    fd, local_tmp = tempfile.mkstemp(prefix="shard-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = HashingWriter(raw)
            yield writer
        fs.put_file(local_tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local_tmp)


def atomic_write_bytes(url: str, data: bytes) -> None:
    with atomic_writer(url) as out:
        out.write(data)
