"""A job's datasets by role: the manifests its `data:` block names or builds, and their digests."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.config import JobConfig
from pipeline.data.fsutil import absolute_url, join_url

logger = logging.getLogger(__name__)


@dataclass
class Datasets:
    manifests: dict[str, str]  # role ("pretrain", "train", "eval") -> manifest URL
    digests: dict[str, str] = field(default_factory=dict)  # role -> digest, for manifests that exist


def resolve_datasets(job: JobConfig, *, build: bool, shard_workers: int | None = None) -> Datasets:
    """With build=True, data.build's shards are written first (Ray tasks, or in-process when
    shard_workers=0) and every manifest must load; with build=False (plan) missing ones are left out."""
    from pipeline.data.manifest import load_manifest

    data = job.data
    splits: dict[str, str] = {}
    if data.build is not None:
        dest = absolute_url(build_dest(job))
        for split in data.build.splits:
            splits[split] = build_split(job, split, dest, shard_workers) if build else \
                join_url(dest, f"{split}.manifest.json")
    splits.update({k: v for k, v in (("train", data.train), ("val", data.val)) if v})
    manifests = {role: splits[split] for role, split in (("train", "train"), ("eval", "val")) if split in splits}
    pretrain = data.pretrain or splits.get("train")
    if pretrain:
        manifests["pretrain"] = pretrain
    digests = {}
    for role, url in manifests.items():
        if build:
            digests[role] = load_manifest(url).digest
            continue
        try:
            digests[role] = load_manifest(url).digest
        except Exception:  # noqa: BLE001 - shards not built yet is a normal state for a plan
            pass
    return Datasets(manifests, digests)


def build_dest(job: JobConfig) -> str:
    """data.build.dest, else a folder named by the build's fingerprint: two jobs building other data
    never write into one folder, and the same build again reuses its shards."""
    from pipeline.data.identity import default_build_dest

    build = job.data.build
    assert build is not None
    if build.dest:
        return build.dest
    return default_build_dest(job.output_root, build.source, root=build.root, seed=job.seed,
                              shard_max_count=build.shard_max_count, shard_max_mb=build.shard_max_mb,
                              options=build.options)


def build_split(job: JobConfig, split: str, dest: str, workers: int | None) -> str:
    """Write one split's shards (idempotent: reuses what is already there); returns its manifest URL."""
    from pipeline.data.writer import write_shards

    build = job.data.build
    assert build is not None
    logger.info("shards: %s/%s -> %s", build.source, split, dest)
    report = write_shards(build.source, dest, split=split, root=build.root, shard_max_count=build.shard_max_count,
                          shard_max_mb=build.shard_max_mb, seed=job.seed, workers=workers,
                          progress=workers != 0, **build.options)
    return report.manifest_url
