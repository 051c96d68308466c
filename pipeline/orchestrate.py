"""The driver: run a job's stage graph on Ray, record it in MLflow, skip what is already done.

    shards (Ray tasks) ─► pretrain ─► finetune ─► evaluate      (each stage: Ray Train TorchTrainer)

A stage's fingerprint hashes its resolved settings (plus the model, engine, seed and scaling that
change its result) and the digests of what it reads (dataset manifests, upstream export). When
MLflow already holds a FINISHED run of that stage with that fingerprint, the stage is skipped and
that run's outputs are reused; so re-running a job after a crash redoes only what is missing, and
changing a finetune setting reruns finetune and evaluate only. A stage that did start keeps its
Ray Train trial name (`{job}-{stage}-{fingerprint[:12]}`), so a re-run also resumes its checkpoints.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline import lineage
from pipeline.config import JobConfig, flatten_params, resolved_dict
from pipeline.errors import PipelineError
from pipeline.fingerprint import stage_fingerprint
from pipeline.stages.context import StageInputs, StageResult

logger = logging.getLogger(__name__)

STAGE_ORDER = ("pretrain", "finetune", "evaluate")
UPSTREAM = {"finetune": "pretrain", "evaluate": "finetune"}
# dataset roles each stage reads, and the manifest each role comes from
STAGE_ROLES = {"pretrain": ("pretrain",), "finetune": ("train", "eval"), "evaluate": ("eval",)}
EXPORT_URL_TAG = "pipeline.export_url"
EXPORT_DIGEST_TAG = "pipeline.export_digest"


# --------------------------------------------------------------------------- locations


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def absolute_url(url: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URLs stay as they are."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    return url if is_remote(url) else os.path.abspath(url)


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


# --------------------------------------------------------------------------- data


def dataset_manifests(job: JobConfig, build: bool = True, workers: int | None = None) -> dict[str, str]:
    """Manifest URL per role (pretrain, train, eval); builds shards first when the job says so."""
    data = job.data
    urls: dict[str, str] = {}
    if data.build is not None:
        dest = absolute_url(data.build.dest or join(job.output_root, "shards"))
        for split in data.build.splits:
            urls[split] = build_split(job, split, dest, workers) if build else join(dest, f"{split}.manifest.json")
    if data.train:
        urls["train"] = data.train
    if data.val:
        urls["val"] = data.val
    roles = {}
    if "train" in urls:
        roles["train"] = urls["train"]
    if "val" in urls:
        roles["eval"] = urls["val"]
    pretrain = data.pretrain or urls.get("train")
    if pretrain:
        roles["pretrain"] = pretrain
    return roles


def build_split(job: JobConfig, split: str, dest: str, workers: int | None = None) -> str:
    """Write one split's shards as Ray tasks, or in-process with workers=0 (idempotent)."""
    from pipeline.data.writer import write_shards

    build = job.data.build
    assert build is not None
    logger.info("shards: %s/%s -> %s", build.source, split, dest)
    report = write_shards(
        build.source,
        dest,
        split=split,
        root=build.root,
        shard_max_count=build.shard_max_count,
        shard_max_mb=build.shard_max_mb,
        seed=job.seed,
        workers=workers,
        **build.options,
    )
    return report.manifest_url


def manifest_digests(manifests: dict[str, str]) -> dict[str, str]:
    from pipeline.data.manifest import load_manifest

    return {role: load_manifest(url).digest for role, url in manifests.items()}


# --------------------------------------------------------------------------- fingerprints


def stage_settings(job: JobConfig, stage: str) -> dict[str, Any]:
    """Everything that changes a stage's result (not where it logs or how often)."""
    settings = {
        "stage": resolved_dict(getattr(job.stages, stage)),
        "model": resolved_dict(job.model),
        "seed": job.seed,
        "data": {"num_workers": job.data.num_workers, "on_error": job.data.on_error},
    }
    if stage != "evaluate":
        settings["deepspeed"] = resolved_dict(job.deepspeed)
        settings["world_size"] = job.scaling.num_workers
    return settings


def explicit_upstream(job: JobConfig, stage: str) -> str | None:
    """An export URL the spec names directly (finetune.init URL, evaluate.export)."""
    if stage == "finetune" and job.stages.finetune.init not in ("pretrain", "scratch"):
        return job.stages.finetune.init
    if stage == "evaluate" and job.stages.evaluate.export:
        return job.stages.evaluate.export
    return None


def consumes_upstream(job: JobConfig, stage: str) -> bool:
    return stage == "evaluate" or (stage == "finetune" and job.stages.finetune.init != "scratch")


# --------------------------------------------------------------------------- the run


@dataclass
class StageOutcome:
    stage: str
    fingerprint: str
    run_id: str | None
    result: StageResult
    skipped: bool


@dataclass
class JobOutcome:
    job_run_id: str
    tracking_uri: str
    stages: dict[str, StageOutcome] = field(default_factory=dict)


def selected_stages(job: JobConfig, only: list[str] | None) -> list[str]:
    if only:
        unknown = [s for s in only if s not in STAGE_ORDER]
        if unknown:
            raise PipelineError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_ORDER)}")
        return [s for s in STAGE_ORDER if s in only]
    return [s for s in STAGE_ORDER if getattr(job.stages, s).enabled]


def connect_ray(job: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        logger.info("no RAY_ADDRESS: starting a local Ray")
        ray.init()


def run_job(job: JobConfig, only: list[str] | None = None, job_file: str | None = None) -> JobOutcome:
    from pipeline import tracking
    from pipeline.ray_stage import run_stage_on_ray

    stages = selected_stages(job, only)
    tracker = tracking.prepare(job.mlflow)  # fails fast on an unreachable server, creates the DB once
    connect_ray(job)
    manifests = dataset_manifests(job)
    digests = manifest_digests(manifests)
    output_root = absolute_url(job.output_root)
    storage_path = join(output_root, "ray")

    job_tags = {"pipeline.job_file": job_file or ""}
    job_run_id = tracker.start_job_run(job.name, flatten_params(job), tags=job_tags)
    outcome = JobOutcome(job_run_id, tracker.tracking_uri)
    status = "FAILED"
    try:
        for stage in stages:
            upstream_stage = UPSTREAM.get(stage)
            upstream = outcome.stages.get(upstream_stage) if upstream_stage else None
            step = run_one_stage(job, stage, tracker, job_run_id, manifests, digests, upstream,
                                 output_root, storage_path, run_stage_on_ray)
            outcome.stages[stage] = step
        status = "FINISHED"
    finally:
        tracker.finish_run(job_run_id, status)
    return outcome


def stage_inputs(job: JobConfig, stage: str, manifests: dict[str, str],
                 upstream: StageOutcome | None) -> tuple[StageInputs, str | None]:
    """The stage's inputs and the upstream export URL it consumes (None for none)."""
    roles = {role: manifests[role] for role in STAGE_ROLES[stage] if role in manifests}
    missing = [role for role in STAGE_ROLES[stage] if role not in manifests]
    if missing:
        raise PipelineError(
            f"stage {stage} needs dataset role(s) {missing}: set data.train/val/pretrain or data.build"
        )
    export = explicit_upstream(job, stage)
    if export is None and upstream is not None:
        export = upstream.result.export_url
    needs_upstream = consumes_upstream(job, stage)
    if needs_upstream and export is None:
        source = UPSTREAM[stage]
        where = {"finetune": "stages.finetune.init (an export URL or 'scratch')",
                 "evaluate": "stages.evaluate.export"}[stage]
        raise PipelineError(
            f"stage {stage} needs the {source} export: run {source} in the same job, or set {where}"
        )
    return StageInputs(manifests=roles, upstream_export=export if needs_upstream else None), (
        export if needs_upstream else None
    )


@dataclass
class StageStart:
    """A stage that must run: its MLflow run is open, its inputs and output location are fixed."""

    stage: str
    fingerprint: str
    run_id: str
    inputs: StageInputs
    output_url: str
    trial_name: str


def begin_stage(job, stage, tracker, job_run_id, manifests, digests, upstream,
                output_root) -> StageStart | StageOutcome:
    """Fingerprint the stage; return the cached outcome, or open its MLflow run with inputs and lineage."""
    from pipeline.export import export_digest

    inputs, upstream_export = stage_inputs(job, stage, manifests, upstream)
    input_digests = {role: digests[role] for role in inputs.manifests}
    from_upstream_run = upstream is not None and upstream.result.export_url == upstream_export
    if upstream_export:
        input_digests["upstream"] = (
            upstream.result.export_digest if from_upstream_run else export_digest(upstream_export)
        )
    fingerprint = stage_fingerprint(stage, stage_settings(job, stage), input_digests)

    cached = tracker.find_finished_stage(stage, fingerprint)
    if cached is not None:
        tags, metrics = cached.data.tags, cached.data.metrics
        result = StageResult(export_url=tags.get(EXPORT_URL_TAG) or None,
                             export_digest=tags.get(EXPORT_DIGEST_TAG) or None, metrics=dict(metrics))
        logger.info("stage %s: skipped, fingerprint %s already finished in MLflow run %s",
                    stage, fingerprint[:12], cached.info.run_id)
        tracker.set_tags(job_run_id, {f"pipeline.{stage}.reused_run_id": cached.info.run_id})
        return StageOutcome(stage, fingerprint, cached.info.run_id, result, skipped=True)

    params = flatten_params(getattr(job.stages, stage), prefix=f"stages.{stage}")
    run_id = tracker.start_stage_run(job_run_id, stage, fingerprint, params=params)
    for role, url in inputs.manifests.items():
        # the lineage tags name the dataset the stage learned from (eval data only for evaluate)
        primary = role != "eval" or stage == "evaluate"
        tracker.log_dataset(run_id, url, digests[role], context=role, primary=primary)
    if upstream_export:
        if from_upstream_run:
            tracker.set_upstream(run_id, upstream.run_id, upstream_export)
        else:  # an export named in the spec: no run to point at, only the artifact
            tracker.set_tags(run_id, {lineage.UPSTREAM_ARTIFACT_URI: upstream_export})
    return StageStart(stage, fingerprint, run_id, inputs, output_url=join(output_root, f"{stage}-{fingerprint[:12]}"),
                      trial_name=f"{job.name}-{stage}-{fingerprint[:12]}")


def finish_stage(tracker, start: StageStart, result: StageResult | None, job: JobConfig) -> StageOutcome | None:
    """Record a finished stage (result given) or mark its run FAILED (result None)."""
    if result is None:
        tracker.finish_run(start.run_id, "FAILED")
        return None
    try:
        record_result(tracker, start.run_id, start.stage, result, job)
    except BaseException:
        tracker.finish_run(start.run_id, "FAILED")
        raise
    tracker.finish_run(start.run_id, "FINISHED")
    return StageOutcome(start.stage, start.fingerprint, start.run_id, result, skipped=False)


def run_one_stage(job, stage, tracker, job_run_id, manifests, digests, upstream, output_root, storage_path,
                  launcher) -> StageOutcome:
    start = begin_stage(job, stage, tracker, job_run_id, manifests, digests, upstream, output_root)
    if isinstance(start, StageOutcome):
        return start
    try:
        result = launcher(job, stage, start.inputs, run_id=start.run_id, tracker=tracker,
                          output_url=start.output_url, storage_path=storage_path, trial_name=start.trial_name)
    except BaseException:
        finish_stage(tracker, start, None, job)
        raise
    return finish_stage(tracker, start, result, job)


def record_result(tracker, run_id: str, stage: str, result: StageResult, job: JobConfig) -> None:
    """The export as an artifact and tags for caching; register the classifier.

    The stage itself logged its metrics, images and reports (rank 0), so nothing is logged twice.
    """
    tags = {}
    if result.export_url:
        tags[EXPORT_URL_TAG] = result.export_url
        tracker.log_artifacts(run_id, result.export_url, "export")
    if result.export_digest:
        tags[EXPORT_DIGEST_TAG] = result.export_digest
    if tags:
        tracker.set_tags(run_id, tags)
    if stage == "finetune" and result.export_url:
        version = tracker.register_classifier(
            run_id, result.export_url, job.mlflow.registered_model,
            description=f"Spikformer classifier finetuned by job {job.name}, MLflow run {run_id}",
        )
        tracker.set_tags(run_id, {"pipeline.registered_model": f"{version.name}/{version.version}"})


# --------------------------------------------------------------------------- plan


@dataclass
class PlannedStage:
    stage: str
    fingerprint: str | None
    status: str  # "skip (run ...)", "run", "run (fingerprint known after upstream)"


def plan_job(job: JobConfig, only: list[str] | None = None) -> list[PlannedStage]:
    """What `run` would do now, without starting Ray or training: fingerprints and cache hits."""
    from pipeline import tracking
    from pipeline.export import export_digest

    try:
        tracker = tracking.prepare(job.mlflow)
    except PipelineError as err:  # a plan is still useful from a laptop that cannot see the cluster's MLflow
        logger.warning("cache status unknown: %s", err)
        tracker = None
    manifests = dataset_manifests(job, build=False)
    digests: dict[str, str] = {}
    for role, url in manifests.items():
        try:
            digests[role] = manifest_digests({role: url})[role]
        except Exception:  # noqa: BLE001 - shards not built yet is a normal state for a plan
            pass
    planned: list[PlannedStage] = []
    upstream_digest: str | None = None
    upstream_known = True
    for stage in selected_stages(job, only):
        roles = [r for r in STAGE_ROLES[stage] if r in manifests]
        known = all(r in digests for r in roles)
        inputs = {r: digests[r] for r in roles if r in digests}
        export = explicit_upstream(job, stage)
        if consumes_upstream(job, stage):
            if export:
                try:
                    inputs["upstream"] = export_digest(export)
                except Exception:  # noqa: BLE001
                    known = False
            elif upstream_known and upstream_digest:
                inputs["upstream"] = upstream_digest
            else:
                known = False
        if not known:
            planned.append(PlannedStage(stage, None, "run (fingerprint known once its inputs exist)"))
            upstream_known, upstream_digest = False, None
            continue
        fingerprint = stage_fingerprint(stage, stage_settings(job, stage), inputs)
        if tracker is None:
            planned.append(PlannedStage(stage, fingerprint, "run unless MLflow holds it (MLflow unreachable)"))
            upstream_known, upstream_digest = False, None
            continue
        cached = tracker.find_finished_stage(stage, fingerprint)
        if cached is not None:
            planned.append(PlannedStage(stage, fingerprint, f"skip (finished run {cached.info.run_id})"))
            upstream_digest = cached.data.tags.get(EXPORT_DIGEST_TAG)
            upstream_known = upstream_digest is not None
        else:
            planned.append(PlannedStage(stage, fingerprint, "run"))
            upstream_known, upstream_digest = False, None
    return planned
