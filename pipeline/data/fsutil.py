"""fsspec helpers: resolve URLs, check a destination, write atomically, read through an outage.

Atomic writes never leave a partial object under its final name:
- local and memory filesystems: write `<name>.tmp-<uuid>` beside the target, then rename it;
- object stores (s3, gs, ...): build the object in a local temporary file, then upload it with one
  `put_file`; S3/GCS make an object visible only once its (multipart/resumable) upload completes.

Reading through an outage (`read_options`, `outage_cause`): an S3 read is retried by botocore's own
retry handler ("standard" mode: exponential backoff with jitter, up to `S3_READ_ATTEMPTS` attempts,
about a minute in all) on connection errors, timeouts, 5xx and throttling, and s3fs adds its own
retries for dropped connections and SlowDown. Only what is still failing after those is ours to name:
`outage_cause` tells an unreachable store from bad bytes, so the reader raises `StorageUnavailable`
(a retry of the stage may fix it) rather than calling the shard corrupt. The settings are botocore's
and fsspec's own: AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, and `config_kwargs` in fsspec's s3 config
(`~/.config/fsspec/s3.json` or FSSPEC_S3_*), which win over the defaults here.
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
S3_PROTOCOLS = ("s3://", "s3a://")
S3_READ_ATTEMPTS = 8  # botocore total attempts; standard mode's backoff sums to about 45 s on average
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 30

# Exception classes (by name, anywhere in an error's class hierarchy) that mean "the store did not
# answer", as opposed to an answer we did not like: botocore's connection and timeout errors,
# aiohttp's connection/payload errors (s3fs's transport), fsspec's timeout.
_OUTAGE_CLASSES = {
    "HTTPClientError",  # botocore: ConnectionClosedError, ReadTimeoutError, ProxyConnectionError, ...
    "EndpointConnectionError", "ConnectTimeoutError", "ResponseStreamingError",
    "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError",  # aiohttp
    "FSTimeoutError",  # fsspec
    "ConnectionError", "TimeoutError",  # builtins (refused, reset, socket timeouts) and botocore's own ConnectionError
}
# S3 error codes that are the service's trouble, not the request's (5xx and throttling)
_OUTAGE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                 "ThrottlingException", "RequestLimitExceeded", "503", "500", "502", "504"}


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


def read_options(url: str) -> dict[str, Any]:
    """fsspec storage options for reading `url`: for s3, botocore's retry and timeout settings (the
    module doc says why); {} elsewhere. AWS_MAX_ATTEMPTS / AWS_RETRY_MODE and fsspec's own s3
    `config_kwargs` override these defaults."""
    if not url.startswith(S3_PROTOCOLS):
        return {}
    import fsspec.config

    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_READ_ATTEMPTS)
    mode = os.environ.get("AWS_RETRY_MODE") or "standard"
    config_kwargs = {
        "retries": {"mode": mode, "total_max_attempts": attempts},
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "read_timeout": S3_READ_TIMEOUT_S,
        **(fsspec.config.conf.get("s3", {}).get("config_kwargs") or {}),
    }
    return {"config_kwargs": config_kwargs}


def describe_read_retries(url: str) -> str:
    """How hard the client tried before giving up (for the outage message)."""
    retries = read_options(url).get("config_kwargs", {}).get("retries", {})
    attempts = retries.get("total_max_attempts", retries.get("max_attempts"))
    return f"{attempts} attempts, botocore {retries.get('mode')} retries" if attempts else "the client's retries"


def outage_cause(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain that says the store did not answer (connection refused/reset/closed,
    timeout, 5xx, throttling), or None when it answered (missing object, denied, bad bytes)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if names & _OUTAGE_CLASSES:
            return current
        response = getattr(current, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
            if code in _OUTAGE_CODES or int(status) >= 500:
                return current
        current = current.__cause__ or current.__context__
    return None


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
