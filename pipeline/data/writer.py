"""Write an image source as WebDataset shards plus a manifest, in parallel Ray tasks.

    write_shards("imagefolder", "s3://bucket/pets", root="/data/pets", split="train", shard_max_mb=256)

Output in DEST: `{split}-{index:06d}.tar` shards and `{split}.manifest.json` (see manifest.py),
the manifest written last. The sample list is shuffled with `seed` before it is cut into shards
(class-sorted sources would otherwise give class-clustered shards), so the same command always
gives the same shards. Each Ray task writes a group of shards; a shard that already exists is kept
if it verifies against the plan (complete tar, the planned keys and labels in order, same encoding;
planned samples missing from it must still fail to decode), otherwise it is rewritten. Images that
fail to read or decode are skipped and listed in the manifest with the reason.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

from pipeline.data import fsutil
from pipeline.data.manifest import Manifest, ShardEntry, SkippedEntry, manifest_name
from pipeline.data.shardio import (
    TAR_MTIME,
    CorruptImage,
    EncodeOptions,
    HashingReader,
    encode_image,
    image_ext,
    iter_tar_samples,
    sample_record,
)
from pipeline.data.sources import SampleRef, make_source
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

TAR_OVERHEAD_PER_SAMPLE = 3 * 1024  # three members, each a 512-byte header plus padding


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str
    refs: tuple[SampleRef, ...]


@dataclass
class ShardResult:
    index: int
    name: str
    samples: int
    bytes: int
    sha256: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: bool = False


@dataclass
class WriteReport:
    manifest: Manifest
    manifest_url: str
    written: int
    reused: int

    @property
    def skipped(self) -> int:
        return len(self.manifest.skipped)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def plan_shards(
    refs: list[SampleRef], split: str, *, seed: int, max_count: int | None, max_mb: float | None
) -> list[ShardPlan]:
    """Shuffle with `seed`, then cut greedily at max_count samples or max_mb (estimated from source sizes)."""
    if max_count is not None and max_count < 1:
        raise PipelineError(f"shard_max_count must be >= 1, got {max_count}")
    if max_mb is not None and max_mb <= 0:
        raise PipelineError(f"shard_max_mb must be > 0, got {max_mb}")
    order = list(refs)
    random.Random(seed).shuffle(order)
    max_bytes = None if max_mb is None else max_mb * 1024 * 1024
    plans: list[ShardPlan] = []
    current: list[SampleRef] = []
    current_bytes = 0
    for ref in order:
        size = ref.size + TAR_OVERHEAD_PER_SAMPLE
        full = (max_count is not None and len(current) >= max_count) or (
            max_bytes is not None and current and current_bytes + size > max_bytes
        )
        if full:
            plans.append(ShardPlan(len(plans), shard_name(split, len(plans)), tuple(current)))
            current, current_bytes = [], 0
        current.append(ref)
        current_bytes += size
    if current:
        plans.append(ShardPlan(len(plans), shard_name(split, len(plans)), tuple(current)))
    return plans


# --------------------------------------------------------------------------- one shard (runs in a task)


def _load_sample(source: Any, ref: SampleRef, options: EncodeOptions) -> tuple[str, bytes, int, int]:
    try:
        data = source.read(ref)
    except Exception as exc:
        raise CorruptImage(f"unreadable: {fsutil.describe_fs_error(exc)}") from None
    return encode_image(data, options)


def _write_shard(source: Any, dest: str, plan: ShardPlan, options: EncodeOptions) -> ShardResult:
    from webdataset import TarWriter

    skipped: list[tuple[str, str]] = []
    samples = 0
    with fsutil.atomic_writer(fsutil.join_url(dest, plan.name)) as out:
        tar = TarWriter(out, encoder=False, mtime=TAR_MTIME)
        for ref in plan.refs:
            try:
                ext, payload, width, height = _load_sample(source, ref, options)
            except CorruptImage as exc:
                logger.warning("skipping %s: %s", ref.file, exc)
                skipped.append((ref.file, str(exc)))
                continue
            tar.write(sample_record(ref.key, ref.label, ref.file, ext, payload, width, height, options.recipe))
            samples += 1
        tar.close()
    return ShardResult(plan.index, plan.name, samples, out.bytes, out.sha256.hexdigest(), skipped)


def _reuse_existing(source: Any, dest: str, plan: ShardPlan, options: EncodeOptions) -> ShardResult | None:
    """The existing shard's result if it matches the plan, else None (absent, partial or stale)."""
    import json

    fs, path = fsutil.url_to_fs(fsutil.join_url(dest, plan.name))
    try:
        if not fs.exists(path):
            return None
        planned = {ref.key: ref for ref in plan.refs}
        found: list[str] = []
        with fs.open(path, "rb") as raw:
            reader = HashingReader(raw)
            for sample in iter_tar_samples(reader, plan.name):
                ref = planned.get(sample["__key__"])
                if ref is None or image_ext(sample) is None or int(sample.get("cls", b"-1")) != ref.label:
                    return None
                if json.loads(sample.get("json", b"{}")).get("encoding") != options.recipe:
                    return None
                found.append(ref.key)
            reader.drain()
    except Exception as exc:  # unreadable or truncated: rewrite it
        logger.info("%s: existing shard is not usable (%s); rewriting", plan.name, exc)
        return None
    present = set(found)
    if found != [ref.key for ref in plan.refs if ref.key in present]:
        return None
    skipped = []
    for ref in plan.refs:
        if ref.key in present:
            continue
        try:
            _load_sample(source, ref, options)
        except CorruptImage as exc:
            skipped.append((ref.file, str(exc)))
            continue
        return None  # a sample that decodes now is missing: the shard is stale
    return ShardResult(plan.index, plan.name, len(found), reader.bytes, reader.sha256.hexdigest(), skipped, True)


def write_shard_group(source: Any, dest: str, plans: list[ShardPlan], options: EncodeOptions) -> list[ShardResult]:
    """Write (or keep, if verified) each planned shard; the body of one Ray task."""
    results = []
    for plan in plans:
        result = _reuse_existing(source, dest, plan, options)
        if result is None:
            result = _write_shard(source, dest, plan, options)
        results.append(result)
    return results


# --------------------------------------------------------------------------- driver


def _run_in_process(
    source: Any, dest: str, groups: list[list[ShardPlan]], options: EncodeOptions, progress: bool
) -> list[ShardResult]:
    from tqdm import tqdm

    results: list[ShardResult] = []
    with tqdm(total=sum(len(g) for g in groups), unit="shard", disable=not progress) as bar:
        for group in groups:
            results.extend(write_shard_group(source, dest, group, options))
            bar.update(len(group))
    return results


def _run_with_ray(
    source: Any,
    dest: str,
    groups: list[list[ShardPlan]],
    options: EncodeOptions,
    workers: int | None,
    progress: bool,
) -> list[ShardResult]:
    import ray
    from tqdm import tqdm

    started_here = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            logger.info("connecting to Ray at %s", address)
            ray.init(address=address)
        else:
            ray.init(num_cpus=workers, include_dashboard=False)
            started_here = True
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(write_shard_group)
        pending = {task.remote(source, dest, group, options): len(group) for group in groups}
        results: list[ShardResult] = []
        with tqdm(total=sum(pending.values()), unit="shard", disable=not progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    try:
                        results.extend(ray.get(ref))
                    except ray.exceptions.RayTaskError as exc:
                        if isinstance(exc.cause, PipelineError):
                            raise exc.cause from None
                        raise
                    bar.update(pending.pop(ref))
        return results
    finally:
        if started_here:
            ray.shutdown()


def write_shards(
    source: str,
    dest: str,
    *,
    split: str = "train",
    root: str | None = None,
    shard_max_count: int | None = 1000,
    shard_max_mb: float | None = None,
    max_side: int | None = None,
    jpeg_quality: int = 90,
    seed: int = 0,
    workers: int | None = None,
    shards_per_task: int | None = None,
    val_labels: str | None = None,
    devkit_meta: str | None = None,
    progress: bool = True,
) -> WriteReport:
    """Write SOURCE's `split` as shards in DEST and return the report (manifest written last).

    workers: None = Ray with all CPUs it sees (or the cluster in RAY_ADDRESS / an initialised Ray),
    N > 0 = a local Ray with N CPUs, 0 = in this process (no Ray). memory:// always runs in-process.
    """
    from pipeline.data import TOOL_VERSION

    if shard_max_count is None and shard_max_mb is None:
        raise PipelineError("give shard_max_count or shard_max_mb (or both)")
    if max_side is not None and max_side < 1:
        raise PipelineError(f"max_side must be >= 1, got {max_side}")
    if not 1 <= jpeg_quality <= 100:
        raise PipelineError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    src = make_source(source, split=split, root=root, val_labels=val_labels, devkit_meta=devkit_meta)
    refs = src.samples()
    if not refs:
        raise PipelineError(f"{root or source}: no images found")
    classes = list(src.classes)
    plans = plan_shards(refs, split, seed=seed, max_count=shard_max_count, max_mb=shard_max_mb)
    fsutil.check_writable(dest)
    options = EncodeOptions(max_side=max_side, jpeg_quality=jpeg_quality)

    in_process = workers == 0 or fsutil.is_process_local(dest) or fsutil.is_process_local(root or "")
    if in_process and workers != 0:
        logger.info("memory:// is visible to this process only: writing in-process instead of Ray tasks")
    per_task = shards_per_task or max(1, math.ceil(len(plans) / (4 * (workers or os.cpu_count() or 1))))
    groups = [list(plans[i : i + per_task]) for i in range(0, len(plans), per_task)]
    logger.info(
        "%s/%s: %d samples, %d classes -> %d shards in %d task(s) at %s",
        source,
        split,
        len(refs),
        len(classes),
        len(plans),
        len(groups),
        dest,
    )
    if in_process:
        results = _run_in_process(src, dest, groups, options, progress)
    else:
        results = _run_with_ray(src, dest, groups, options, workers, progress)
    results.sort(key=lambda r: r.index)

    manifest = Manifest(
        split=split,
        tool_version=TOOL_VERSION,
        source=src.describe(),
        classes=classes,
        num_samples=sum(r.samples for r in results),
        shards=[ShardEntry(url=r.name, samples=r.samples, bytes=r.bytes, sha256=r.sha256) for r in results],
        skipped=[SkippedEntry(file=f, reason=why) for r in results for f, why in r.skipped],
        writer={
            "shard_max_count": shard_max_count,
            "shard_max_mb": shard_max_mb,
            "seed": seed,
            "encoding": options.recipe,
        },
    )
    manifest_url = fsutil.join_url(dest, manifest_name(split))
    fsutil.atomic_write_bytes(manifest_url, manifest.to_json().encode())
    manifest.base_url = dest.rstrip("/")
    reused = sum(r.reused for r in results)
    logger.info(
        "%s: %d samples in %d shards (%d written, %d reused), %d skipped; digest %s",
        manifest_url,
        manifest.num_samples,
        len(results),
        len(results) - reused,
        reused,
        len(manifest.skipped),
        manifest.digest,
    )
    return WriteReport(manifest, manifest_url, written=len(results) - reused, reused=reused)
