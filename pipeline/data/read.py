"""Reading shards: webdataset's tar iteration and sample grouping, with a sha256 of every byte read.

    for sample in shard_samples(ShardSource(url, sha256, samples)):   # {"__key__", "__url__", "jpg", "cls", ...}
        ...

`shard_samples` is webdataset's reader (`tar_file_expander` + `group_by_keys`) over an fsspec file
wrapped in a hashing reader. After the shard's last sample it drains what tarfile left unread
(end-of-archive padding) and compares the digest with the manifest's: the check costs no second
pass over the bytes. What we add is only naming: a tar-level failure is a `ShardReadError` naming
the shard URL and the last good sample key, a digest mismatch a `ShardDigestError` naming the URL,
the expected and the actual digest. A store that does not answer (after fsspec/s3fs/botocore's own
retries, `fsutil.read_options`) is neither: it is a `StorageUnavailable` naming the URL, which a
later retry may fix, and which `on_error="skip"` never skips.

A damaged tar header after the first member is not an error for tarfile's streaming reader (it
ends the archive there), so a shard that stops early is caught by the sample count (stream.py) and
by the digest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.data.fsutil import describe_read_retries, outage_cause, read_options
from pipeline.data.shardio import HashingReader, short_reason
from pipeline.errors import StorageUnavailable


@dataclass(frozen=True)
class ShardSource:
    url: str
    sha256: str | None = None  # the manifest's digest; None: not checked
    samples: int = 0  # the manifest's sample count


class ShardReadError(Exception):
    """The shard could not be opened or its tar stream broke (message names the URL and the last key)."""


class ShardDigestError(Exception):
    """The shard's bytes are not the ones its manifest was written for."""


def shard_samples(source: ShardSource) -> Iterator[dict[str, Any]]:
    """The shard's samples in tar order (webdataset's grouping), then the sha256 check."""
    import fsspec
    from webdataset.tariterators import group_by_keys, tar_file_expander

    last_key = None
    try:
        with fsspec.open(source.url, "rb", **read_options(source.url)) as raw:
            reader = HashingReader(raw)
            for sample in group_by_keys(tar_file_expander([{"url": source.url, "stream": reader}])):
                last_key = sample["__key__"]
                yield sample
            reader.drain()
    except GeneratorExit:  # the consumer stopped early: no verdict on the unread rest
        raise
    except Exception as exc:  # tarfile.ReadError, fsspec/botocore errors, duplicate names, ...
        where = f"after sample {last_key!r}" if last_key else "at the start"
        cause = outage_cause(exc)
        if cause is not None:
            raise StorageUnavailable(
                f"{source.url}: storage unavailable {where} (gave up after {describe_read_retries(source.url)}): "
                f"{short_reason(cause)}; not a data fault: run again once the store answers"
            ) from None
        raise ShardReadError(f"{source.url}: corrupt or truncated shard {where}: {short_reason(exc)}") from None
    actual = reader.sha256.hexdigest()
    if source.sha256 is not None and actual != source.sha256:
        raise ShardDigestError(
            f"{source.url}: sha256 {actual} but the manifest says {source.sha256} "
            f"({reader.bytes} bytes read): the shard changed after its manifest was written"
        )
