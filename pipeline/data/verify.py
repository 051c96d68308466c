"""`shards verify`: re-read every shard of a manifest and compare size, sha256 and sample count.

Stops at the first mismatch and raises PipelineError naming the shard and what differs, so the CLI
prints one line and exits non-zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.data import fsutil
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.shardio import HashingReader, image_ext, iter_tar_samples
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    manifest: Manifest
    shards: int
    samples: int
    bytes: int


def _check_shard(url: str, expected_samples: int, expected_bytes: int, expected_sha256: str) -> None:
    fs, path = fsutil.url_to_fs(url)
    samples = 0
    try:
        with fs.open(path, "rb") as raw:
            reader = HashingReader(raw)
            for sample in iter_tar_samples(reader, url):
                if image_ext(sample) is None or "cls" not in sample:
                    raise PipelineError(f"{url}: sample {sample['__key__']!r} lacks an image or .cls")
                samples += 1
            reader.drain()
    except PipelineError:
        raise
    except FileNotFoundError:
        raise PipelineError(f"{url}: shard listed in the manifest is missing") from None
    except Exception as exc:
        raise PipelineError(f"{url}: unreadable shard: {fsutil.describe_fs_error(exc)}") from None
    if reader.bytes != expected_bytes:
        raise PipelineError(f"{url}: size {reader.bytes} bytes, manifest says {expected_bytes}")
    digest = reader.sha256.hexdigest()
    if digest != expected_sha256:
        raise PipelineError(f"{url}: sha256 {digest} != manifest {expected_sha256}")
    if samples != expected_samples:
        raise PipelineError(f"{url}: {samples} samples, manifest says {expected_samples}")


def verify_manifest(manifest_url: str) -> VerifyReport:
    """Check every shard of the manifest; raise PipelineError at the first mismatch."""
    manifest = load_manifest(manifest_url)
    for entry, url in zip(manifest.shards, manifest.shard_urls(), strict=True):
        _check_shard(url, entry.samples, entry.bytes, entry.sha256)
        logger.debug("%s ok", url)
    return VerifyReport(
        manifest,
        shards=len(manifest.shards),
        samples=manifest.num_samples,
        bytes=sum(entry.bytes for entry in manifest.shards),
    )
