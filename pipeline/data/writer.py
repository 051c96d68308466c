"""Write an image source as WebDataset shards plus a manifest, in parallel Ray tasks.

    write_shards("imagefolder", "s3://bucket/pets", root="/data/pets", split="train", shard_max_mb=256)

Output in DEST: `{split}-{index:06d}.tar` shards and `{split}.manifest.json` (see manifest.py),
the manifest written last. The sample list is shuffled with `seed` before it is cut into shards
(class-sorted sources would otherwise give class-clustered shards), so the same command always
gives the same bytes. Images that fail to read or decode are skipped and listed in the manifest.

A shard set is immutable once its manifest exists:
- The manifest records the build's fingerprint (its settings) and plan digest (settings plus every
  planned sample: key, label, file, size; see identity.py). A build into a folder whose manifest
  has another plan digest (other source, root, seed, split, shard sizes, encoding, or the source's
  files changed) is refused with a PipelineError naming both, unless `new_version=True`
  (`--new-version`): that build goes to the sub-folder `{dest}/v-{plan[:12]}` (same plan, same
  folder: a re-run with --new-version reuses it). The manifest file itself is never rewritten.
- With the same plan, a shard is reused only if its size and sha256 equal the manifest's; any other
  shard (missing, truncated, rotted) is rebuilt, and the rebuilt bytes must hash to the manifest's
  sha256 before they replace the bad file (the writer is deterministic; if the source no longer gives
  the same bytes, the set cannot be repaired and the build fails, naming the shard, leaving it as it
  was). Each rewritten shard is logged with its reason and listed in `WriteReport.rewritten`.
- Before the first manifest of a split exists, the folder is held by a claim file
  `{split}.building.json` (created exclusively, see publish.py) naming the plan: a concurrent or
  later build with the same plan cooperates (byte-identical shards, each written to a temporary
  name and renamed), one with another plan is refused; so two builds racing for one folder never
  leave a mixed set. The manifest is published exclusively, then the claim is removed. Shards at
  their final names without a manifest (a crashed build) are rebuilt: no manifest vouches for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.data import fsutil, identity, publish
from pipeline.data.manifest import Manifest, ShardEntry, SkippedEntry, load_manifest, manifest_name
from pipeline.data.shardio import TAR_MTIME, CorruptImage, EncodeOptions, encode_image, sample_record
from pipeline.data.sources import SampleRef, make_source
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

TAR_OVERHEAD_PER_SAMPLE = 3 * 1024  # three members, each a 512-byte header plus padding
CLAIM_SUFFIX = ".building.json"
VERSION_PREFIX = "v-"


@dataclass(frozen=True)
class ShardPlan:
    index: int
    name: str
    refs: tuple[SampleRef, ...]

    def identity(self) -> list[tuple[str, int, str, int]]:
        """What the plan digest hashes for this shard: (key, label, file, size) of each planned sample."""
        return [(ref.key, ref.label, ref.file, ref.size) for ref in self.refs]


@dataclass
class ShardResult:
    index: int
    name: str
    samples: int
    bytes: int
    sha256: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: bool = False
    reason: str | None = None  # why an existing shard was rewritten


@dataclass
class WriteReport:
    manifest: Manifest
    manifest_url: str
    written: int
    reused: int
    rewritten: list[tuple[str, str]] = field(default_factory=list)  # (shard name, why it was rewritten)
    fingerprint: str = ""
    plan: str = ""

    @property
    def skipped(self) -> int:
        return len(self.manifest.skipped)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def claim_name(split: str) -> str:
    return f"{split}{CLAIM_SUFFIX}"


def versioned_dest(dest: str, plan: str) -> str:
    """Where `new_version=True` writes a build whose plan differs from the manifest at `dest`."""
    return fsutil.join_url(dest, f"{VERSION_PREFIX}{plan[: identity.FINGERPRINT_CHARS]}")


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


class _ShardMismatch(PipelineError):
    """The rebuilt shard does not hash to the sha256 the manifest recorded."""


def _write_shard(
    source: Any, dest: str, plan: ShardPlan, options: EncodeOptions, expected_sha256: str | None = None
) -> ShardResult:
    """Write the planned shard under a temporary name; publish it only if it hashes as expected."""
    from webdataset import TarWriter

    url = fsutil.join_url(dest, plan.name)
    skipped: list[tuple[str, str]] = []
    samples = 0
    try:
        with fsutil.atomic_writer(url) as out:
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
            digest = out.sha256.hexdigest()
            if expected_sha256 is not None and digest != expected_sha256:
                raise _ShardMismatch(  # raised inside the block: the bad file keeps its name, nothing is replaced
                    f"{url}: rebuilt shard has sha256 {digest}, its manifest says {expected_sha256}: the source "
                    "no longer gives the bytes this set was built from (files changed in place?), so the set "
                    "cannot be repaired; the damaged shard is left as it was: build into another dest"
                )
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"{url}: cannot write shard: {fsutil.describe_fs_error(exc)}") from None
    return ShardResult(plan.index, plan.name, samples, out.bytes, digest, skipped)


def _sha256_of(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_existing_shard(url: str, entry: ShardEntry) -> str | None:
    """None if the file at `url` has the entry's size and sha256, else why not (one short phrase)."""
    fs, path = fsutil.url_to_fs(url)
    try:
        size = fs.info(path)["size"]
        if size != entry.bytes:
            return f"size {size} bytes, manifest says {entry.bytes}"
        digest = _sha256_of(fs, path)
    except FileNotFoundError:
        return "listed in the manifest but missing"
    except Exception as exc:
        return f"unreadable ({fsutil.describe_fs_error(exc)})"
    if digest != entry.sha256:
        return f"sha256 {digest} != manifest {entry.sha256}"
    return None


def write_shard_group(
    source: Any,
    dest: str,
    plans: list[ShardPlan],
    options: EncodeOptions,
    expected: dict[str, ShardEntry] | None = None,
) -> list[ShardResult]:
    """Write each planned shard, or keep it where `expected` (the manifest's entries) vouches for its bytes.

    The body of one Ray task. Without `expected` (no manifest yet) every shard is written.
    """
    results = []
    for plan in plans:
        entry = (expected or {}).get(plan.name)
        if entry is not None:
            reason = check_existing_shard(fsutil.join_url(dest, plan.name), entry)
            if reason is None:
                kept = ShardResult(plan.index, plan.name, entry.samples, entry.bytes, entry.sha256, reused=True)
                results.append(kept)
                continue
            logger.warning("%s: rewriting: %s", plan.name, reason)
            result = _write_shard(source, dest, plan, options, expected_sha256=entry.sha256)
            result.reason = reason
        else:
            result = _write_shard(source, dest, plan, options)
        results.append(result)
    return results


# --------------------------------------------------------------------------- which folder, and may we write it


@dataclass(frozen=True)
class _Build:
    """The identity of this build (settings, fingerprint, plan digest) for one split."""

    split: str
    settings: dict[str, Any]
    fingerprint: str
    plan: str

    def claim_record(self) -> bytes:
        record = {
            "fingerprint": self.fingerprint,
            "plan": self.plan,
            "build": self.settings,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "by": f"{socket.gethostname()}:{os.getpid()}",
        }
        return json.dumps(record, indent=1).encode()


def _load_if_exists(manifest_url: str) -> Manifest | None:
    fs, path = fsutil.url_to_fs(manifest_url)
    try:
        if not fs.exists(path):
            return None
    except Exception as exc:
        raise PipelineError(f"{manifest_url}: cannot check for a manifest: {fsutil.describe_fs_error(exc)}") from None
    return load_manifest(manifest_url)


def _conflict_with_manifest(manifest: Manifest, manifest_url: str, build: _Build) -> str | None:
    """None if the manifest is this build's; else one line saying how they differ."""
    plan = manifest.writer.get("plan")
    if plan == build.plan:
        return None
    ours = f"this build is {build.fingerprint[:12]} (plan {build.plan[:12]})"
    if plan is None:
        return (
            f"{manifest_url} holds data set {manifest.digest[:12]}, written by an older writer without a build "
            f"fingerprint, so it cannot be shown to be this build's; {ours}"
        )
    old_fp = str(manifest.writer.get("fingerprint"))
    if old_fp == build.fingerprint:
        why = "same settings, but the source's samples changed"
    else:
        why = identity.settings_difference(manifest.writer.get("build", {}), build.settings)
    return (
        f"{manifest_url} holds data set {manifest.digest[:12]} (build {old_fp[:12]}, plan {plan[:12]}); {ours}: {why}"
    )


def _conflict_with_claim(claim: dict[str, Any], claim_url: str, build: _Build) -> str | None:
    if claim.get("plan") == build.plan:
        return None
    why = identity.settings_difference(claim.get("build", {}), build.settings) or "the source's samples differ"
    return (
        f"{claim_url}: an unfinished build {str(claim.get('fingerprint'))[:12]} (plan {str(claim.get('plan'))[:12]}, "
        f"started {claim.get('started')} by {claim.get('by')}) holds this folder; this build is "
        f"{build.fingerprint[:12]} (plan {build.plan[:12]}): {why}; let it finish (or delete the claim if it died)"
    )


def _take_folder(folder: str, build: _Build) -> tuple[Manifest | None, str | None]:
    """(the manifest this build repairs against, or None: the folder is claimed for it; conflict line or None)."""
    manifest_url = fsutil.join_url(folder, manifest_name(build.split))
    claim_url = fsutil.join_url(folder, claim_name(build.split))
    for _ in range(5):  # a claim can vanish between our create and read: its build has just finished
        existing = _load_if_exists(manifest_url)
        if existing is not None:
            return existing, _conflict_with_manifest(existing, manifest_url, build)
        fsutil.check_writable(folder)
        created = publish.create_exclusive(claim_url, build.claim_record())
        if not created:
            claim = publish.read_json(claim_url)
            if claim is None:
                continue
            conflict = _conflict_with_claim(claim, claim_url, build)
            if conflict:
                return None, conflict
        # a manifest published before we claimed (its build then dropped its claim) wins
        existing = _load_if_exists(manifest_url)
        if existing is not None:
            if created:
                publish.remove(claim_url)
            return existing, _conflict_with_manifest(existing, manifest_url, build)
        return None, None
    raise PipelineError(f"{claim_url}: claims keep appearing and vanishing; is another build looping on this folder?")


def _choose_folder(dest: str, build: _Build, new_version: bool) -> tuple[str, Manifest | None]:
    existing, conflict = _take_folder(dest, build)
    if conflict is None:
        return dest, existing
    version = versioned_dest(dest, build.plan)
    if not new_version:
        raise PipelineError(
            f"refused: {conflict}; a shard set is never changed in place: write to another dest, or pass "
            f"--new-version (new_version=True) to write {version}"
        )
    logger.info("%s: %s; writing a new version in %s", dest, conflict, version)
    existing, conflict = _take_folder(version, build)
    if conflict is not None:
        raise PipelineError(f"refused: {conflict}")
    return version, existing


def _drop_claim(folder: str, build: _Build) -> None:
    """Remove the split's claim once its manifest exists, if it names this build's plan."""
    claim_url = fsutil.join_url(folder, claim_name(build.split))
    claim = publish.read_json(claim_url)
    if claim is not None and claim.get("plan") == build.plan:
        publish.remove(claim_url)


# --------------------------------------------------------------------------- driver


def _run_in_process(
    source: Any,
    dest: str,
    groups: list[list[ShardPlan]],
    options: EncodeOptions,
    expected: dict[str, ShardEntry] | None,
    progress: bool,
) -> list[ShardResult]:
    from tqdm import tqdm

    results: list[ShardResult] = []
    with tqdm(total=sum(len(g) for g in groups), unit="shard", disable=not progress) as bar:
        for group in groups:
            results.extend(write_shard_group(source, dest, group, options, _entries_for(group, expected)))
            bar.update(len(group))
    return results


def _entries_for(group: list[ShardPlan], expected: dict[str, ShardEntry] | None) -> dict[str, ShardEntry] | None:
    if expected is None:
        return None
    return {plan.name: expected[plan.name] for plan in group if plan.name in expected}


def _run_with_ray(
    source: Any,
    dest: str,
    groups: list[list[ShardPlan]],
    options: EncodeOptions,
    expected: dict[str, ShardEntry] | None,
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
        pending = {
            task.remote(source, dest, group, options, _entries_for(group, expected)): len(group) for group in groups
        }
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


def _new_manifest(
    split: str, src: Any, classes: list[str], results: list[ShardResult], options: EncodeOptions, build: _Build
) -> Manifest:
    from pipeline.data import TOOL_VERSION

    return Manifest(
        split=split,
        tool_version=TOOL_VERSION,
        source=src.describe(),
        classes=classes,
        num_samples=sum(r.samples for r in results),
        shards=[ShardEntry(url=r.name, samples=r.samples, bytes=r.bytes, sha256=r.sha256) for r in results],
        skipped=[SkippedEntry(file=f, reason=why) for r in results for f, why in r.skipped],
        writer={
            "shard_max_count": build.settings["shard_max_count"],
            "shard_max_mb": build.settings["shard_max_mb"],
            "seed": build.settings["seed"],
            "encoding": options.recipe,
            "fingerprint": build.fingerprint,
            "plan": build.plan,
            "build": build.settings,
        },
    )


def _publish_manifest(manifest_url: str, manifest: Manifest) -> Manifest:
    """Publish `manifest` unless one is there already, which must then be the same data set."""
    if publish.create_exclusive(manifest_url, manifest.to_json().encode()):
        manifest.base_url = manifest_url.rsplit("/", 1)[0]
        return manifest
    there = load_manifest(manifest_url)  # a concurrent build of the same plan published first
    if there.digest != manifest.digest:
        raise PipelineError(
            f"{manifest_url}: another build published data set {there.digest[:12]} while this one wrote "
            f"{manifest.digest[:12]}; run `shards verify {manifest_url}` and build again"
        )
    return there


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
    new_version: bool = False,
) -> WriteReport:
    """Write SOURCE's `split` as shards in DEST (see the module docstring) and return the report.

    workers: None = Ray with all CPUs it sees (or the cluster in RAY_ADDRESS / an initialised Ray),
    N > 0 = a local Ray with N CPUs, 0 = in this process (no Ray). memory:// always runs in-process.
    new_version: when DEST holds another build of this split, write to `{dest}/v-{plan[:12]}`
    instead of refusing; `WriteReport.manifest_url` says where the manifest went.
    """
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
    options = EncodeOptions(max_side=max_side, jpeg_quality=jpeg_quality)
    settings = identity.build_settings(
        source,
        root=root,
        seed=seed,
        shard_max_count=shard_max_count,
        shard_max_mb=shard_max_mb,
        options=dict(max_side=max_side, jpeg_quality=jpeg_quality, val_labels=val_labels, devkit_meta=devkit_meta),
        split=split,
    )
    fingerprint = identity.fingerprint_of(settings)
    plan = identity.plan_digest(fingerprint, classes, [p.identity() for p in plans])
    build = _Build(split, settings, fingerprint, plan)

    folder, existing = _choose_folder(dest, build, new_version)
    in_process = workers == 0 or fsutil.is_process_local(folder) or fsutil.is_process_local(root or "")
    if in_process and workers != 0:
        logger.info("memory:// is visible to this process only: writing in-process instead of Ray tasks")
    per_task = shards_per_task or max(1, math.ceil(len(plans) / (4 * (workers or os.cpu_count() or 1))))
    groups = [list(plans[i : i + per_task]) for i in range(0, len(plans), per_task)]
    logger.info(
        "%s/%s: %d samples, %d classes -> %d shards in %d task(s) at %s (build %s)",
        source,
        split,
        len(refs),
        len(classes),
        len(plans),
        len(groups),
        folder,
        fingerprint[:12],
    )
    expected = None if existing is None else {entry.url: entry for entry in existing.shards}
    # if this raises, a claim we took stays: no other plan may mix into our partial shards, and a
    # re-run of this same build takes the folder over
    if in_process:
        results = _run_in_process(src, folder, groups, options, expected, progress)
    else:
        results = _run_with_ray(src, folder, groups, options, expected, workers, progress)
    results.sort(key=lambda r: r.index)
    manifest_url = fsutil.join_url(folder, manifest_name(split))
    if existing is not None:
        manifest = existing  # same plan, and every shard now matches it: the manifest stays as it is
    else:
        manifest = _publish_manifest(manifest_url, _new_manifest(split, src, classes, results, options, build))
    _drop_claim(folder, build)
    reused = sum(r.reused for r in results)
    rewritten = [(r.name, r.reason) for r in results if r.reason is not None]
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
    return WriteReport(
        manifest,
        manifest_url,
        written=len(results) - reused,
        reused=reused,
        rewritten=rewritten,
        fingerprint=fingerprint,
        plan=build.plan,
    )
