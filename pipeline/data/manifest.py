"""The shard-set manifest: one JSON file beside the shards that says what the data set is.

Layout (`{split}.manifest.json` in the shard folder, written last by the writer):

    {"format": "spikformer-shards/1", "split": "train", "tool_version": "0.1.0",
     "source": {"name": "imagefolder", "root": "/data/pets", ...},
     "classes": ["cat", "dog"], "num_samples": 1234,
     "shards": [{"url": "train-000000.tar", "samples": 617, "bytes": 81920, "sha256": "..."}, ...],
     "skipped": [{"file": "cat/broken.jpg", "reason": "cannot identify image file"}],
     "writer": {"shard_max_count": 1000, "shard_max_mb": null, "seed": 0, "encoding": "original",
                "fingerprint": "<sha256 of the build settings>", "plan": "<sha256 of settings + samples>",
                "build": {<the settings>}}}

A manifest is written once (exclusively, see publish.py) and never changed in place: the writer
refuses a build whose plan differs from it (writer.py; the fingerprint and plan are identity.py's).

A relative shard `url` is resolved against the manifest's own folder, so a shard set can be copied
to another bucket as a whole; absolute URLs are used as they are. The digest (`manifest_digest`)
hashes only what defines the data (split, classes, shard names, counts and hashes), not where the
source lived or which tool wrote it, so it identifies the data set in MLflow.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import PipelineError, StorageUnavailable

MANIFEST_FORMAT = "spikformer-shards/1"
MANIFEST_SUFFIX = ".manifest.json"


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="shard URL, relative to the manifest's folder or absolute")
    samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str


class SkippedEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    reason: str


class Manifest(BaseModel):
    """A parsed manifest. `base_url` (the manifest's folder) is set by `load_manifest`, not stored."""

    model_config = ConfigDict(extra="forbid")

    format: str = MANIFEST_FORMAT
    split: str
    tool_version: str
    source: dict[str, Any]
    classes: list[str]
    num_samples: int = Field(ge=0)
    shards: list[ShardEntry]
    skipped: list[SkippedEntry] = []
    writer: dict[str, Any] = {}
    base_url: str | None = Field(None, exclude=True)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def digest(self) -> str:
        return manifest_digest(self)

    def shard_urls(self) -> list[str]:
        """Absolute URLs of every shard, in manifest order."""
        return [resolve_url(self.base_url, shard.url) for shard in self.shards]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"


def manifest_digest(manifest: Manifest) -> str:
    """sha256 over the data-defining fields (split, classes, shard names/counts/sizes/hashes)."""
    content = {
        "format": manifest.format,
        "split": manifest.split,
        "classes": manifest.classes,
        "num_samples": manifest.num_samples,
        "shards": [[s.url.rsplit("/", 1)[-1], s.samples, s.bytes, s.sha256] for s in manifest.shards],
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def resolve_url(base_url: str | None, url: str) -> str:
    if "://" in url or url.startswith("/") or not base_url:
        return url
    return base_url.rstrip("/") + "/" + url


def manifest_name(split: str) -> str:
    return f"{split}{MANIFEST_SUFFIX}"


def parse_manifest(text: str, url: str) -> Manifest:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{url}: manifest is not valid JSON: {exc}") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise PipelineError(f"{url}: invalid manifest: {where}: {first['msg']}") from None
    if manifest.format != MANIFEST_FORMAT:
        raise PipelineError(f"{url}: manifest format {manifest.format!r} is not {MANIFEST_FORMAT!r}")
    counted = sum(shard.samples for shard in manifest.shards)
    if counted != manifest.num_samples:
        raise PipelineError(f"{url}: num_samples {manifest.num_samples} != sum of shard samples {counted}")
    manifest.base_url = url.rsplit("/", 1)[0] if "/" in url else "."
    return manifest


def load_manifest(url: str) -> Manifest:
    """Read and validate a manifest from any fsspec URL; PipelineError names the URL on any problem."""
    import fsspec

    from pipeline.data.fsutil import describe_read_retries, outage_cause, read_options

    try:
        with fsspec.open(url, "rt", encoding="utf-8", **read_options(url)) as fh:
            text = fh.read()
    except FileNotFoundError:
        raise PipelineError(f"{url}: manifest not found") from None
    except Exception as exc:  # fsspec backends raise many types (OSError, botocore errors, ...)
        cause = outage_cause(exc)
        if cause is not None:  # the store did not answer: an outage a later run can get past, not a bad manifest
            raise StorageUnavailable(f"{url}: storage unavailable reading the manifest (gave up after "
                                     f"{describe_read_retries(url)}): {type(cause).__name__}: {cause}") from None
        raise PipelineError(f"{url}: cannot read manifest: {type(exc).__name__}: {exc}") from None
    return parse_manifest(text, url)
