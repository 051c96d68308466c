"""What a shard build is: its settings fingerprint, its plan digest, and the folder it goes to by default.

Two identities, both sha256 hex strings recorded in the manifest's `writer` section:

- the *fingerprint* hashes the build's settings only (source name, root, seed, split, shard sizes,
  encoding recipe, label files), so it is known before the source is listed. Without the split
  it names the default shard folder (`default_build_dest`), which then holds every split of one
  build: two jobs with different settings never share a folder, and a re-run finds its own.
- the *plan* digest hashes the fingerprint, the class names and every planned shard's samples
  (key, label, file, size as listed by the source): it changes when the source's contents change
  even though the settings did not. The writer reuses a manifest only when its plan digest equals
  the new build's; any other difference is a different data set (see writer.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.data.manifest import MANIFEST_FORMAT
from pipeline.data.shardio import EncodeOptions
from pipeline.errors import PipelineError

# build.options keys a job may pass through to write_shards, with the writer's defaults
OPTION_DEFAULTS: dict[str, Any] = {"max_side": None, "jpeg_quality": 90, "val_labels": None, "devkit_meta": None}
# write_shards arguments that change how, not what, it writes: allowed in options, not fingerprinted
NOT_FINGERPRINTED = frozenset({"new_version", "workers", "shards_per_task", "progress"})
FINGERPRINT_CHARS = 12  # in folder names: 48 bits, no clash among the builds one output root holds


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint_of(settings: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON of `build_settings(...)`."""
    return _sha256_json(dict(settings))


def _normalise_location(url: str | None) -> str | None:
    """A local path as an absolute path (a relative root means different data from another cwd)."""
    if url is None or "://" in url:
        return url
    return os.path.abspath(url)


def build_settings(
    source: str,
    *,
    root: str | None = None,
    seed: int = 0,
    shard_max_count: int | None = 1000,
    shard_max_mb: float | None = None,
    options: Mapping[str, Any] | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """The canonical settings that define a build's output (split None: the folder-level settings).

    `options` are the job's `data.build.options` (max_side, jpeg_quality, val_labels, devkit_meta;
    new_version, workers, shards_per_task and progress are accepted and left out); an unknown key is
    a PipelineError naming it. jpeg_quality counts only where images are re-encoded.
    """
    options = {k: v for k, v in (options or {}).items() if k not in NOT_FINGERPRINTED}
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise PipelineError(
            f"data.build.options: unknown option {unknown[0]!r}; known: {', '.join(sorted(OPTION_DEFAULTS))}"
        )
    merged = {**OPTION_DEFAULTS, **options}
    encoding = EncodeOptions(max_side=merged["max_side"], jpeg_quality=merged["jpeg_quality"]).recipe
    settings: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "root": _normalise_location(root),
        "seed": int(seed),
        "shard_max_count": None if shard_max_count is None else int(shard_max_count),
        "shard_max_mb": None if shard_max_mb is None else float(shard_max_mb),
        "encoding": encoding,
        "val_labels": _normalise_location(merged["val_labels"]),
        "devkit_meta": _normalise_location(merged["devkit_meta"]),
    }
    if split is not None:
        settings["split"] = split
    return settings


def build_fingerprint(
    source: str,
    *,
    root: str | None = None,
    seed: int = 0,
    shard_max_count: int | None = 1000,
    shard_max_mb: float | None = None,
    options: Mapping[str, Any] | None = None,
    split: str | None = None,
) -> str:
    """sha256 of `build_settings(...)`: the build's identity before the source is listed."""
    return fingerprint_of(
        build_settings(
            source,
            root=root,
            seed=seed,
            shard_max_count=shard_max_count,
            shard_max_mb=shard_max_mb,
            options=options,
            split=split,
        )
    )


def default_build_dest(
    output_root: str,
    source: str,
    *,
    root: str | None = None,
    seed: int = 0,
    shard_max_count: int | None = 1000,
    shard_max_mb: float | None = None,
    options: Mapping[str, Any] | None = None,
) -> str:
    """`{output_root}/shards/{source}-{fingerprint[:12]}`: the folder a job's build writes by default.

    Split-independent, so one folder holds a build's train and val; another seed, root or shard
    setting gives another folder, the same settings the same folder (a re-run reuses its shards).
    """
    fingerprint = build_fingerprint(
        source,
        root=root,
        seed=seed,
        shard_max_count=shard_max_count,
        shard_max_mb=shard_max_mb,
        options=options,
    )
    return f"{output_root.rstrip('/')}/shards/{source}-{fingerprint[:FINGERPRINT_CHARS]}"


def plan_digest(fingerprint: str, classes: Sequence[str], shards: Iterable[Sequence[Any]]) -> str:
    """sha256 over the fingerprint, class names and each shard's [(key, label, file, size), ...]."""
    return _sha256_json({"fingerprint": fingerprint, "classes": list(classes), "shards": [list(s) for s in shards]})


def settings_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """'seed 0 -> 1, shard_max_count 100 -> 200' for the keys whose values differ."""
    keys = sorted(set(old) | set(new))
    changes = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]
    return ", ".join(changes)
