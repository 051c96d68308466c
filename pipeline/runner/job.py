"""The job loop: per stage, resolve -> open its MLflow run -> launch on a backend -> finish.

A backend launches one stage on every rank and returns rank 0's StageResult:
- `RayBackend` (ray_backend.py): a Ray Train TorchTrainer per stage, from a driver process;
- `LocalBackend` (local_backend.py): the processes torchrun / accelerate launch started; rank 0 runs
  this loop and the other ranks follow it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from pipeline import lineage, tracking
from pipeline.config import JobConfig, flatten_params
from pipeline.runner.context import StageLaunch
from pipeline.runner.datasets import Datasets, resolve_datasets
from pipeline.runner.resolve import StageOutcome, StagePlan, resolve_stage, selected_stages
from pipeline.stages.context import StageResult
from pipeline.stages.table import STAGES

logger = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    shard_workers: int | None  # how shards are written: None = Ray tasks, 0 = in this process

    def start(self, job: JobConfig) -> None: ...

    def launch(self, job: JobConfig, plan: StagePlan, launch: StageLaunch) -> StageResult: ...


@dataclass
class JobOutcome:
    job_run_id: str
    tracking_uri: str
    stages: dict[str, StageOutcome] = field(default_factory=dict)


def run_job(job: JobConfig, backend: Backend, only: list[str] | None = None, job_file: str | None = None) -> JobOutcome:
    stages = selected_stages(job, only)
    tracker = tracking.prepare(job.mlflow)  # fails fast on an unreachable server, creates the DB once
    backend.start(job)
    datasets = resolve_datasets(job, build=True, shard_workers=backend.shard_workers)
    tags = {"pipeline.job_file": job_file or "", "pipeline.launcher": backend.name}
    job_run_id = tracker.start_job_run(job.name, flatten_params(job), tags=tags)
    outcome = JobOutcome(job_run_id, tracker.tracking_uri)
    status = "FAILED"
    try:
        for name in stages:
            outcome.stages[name] = run_stage(job, name, tracker, job_run_id, datasets, outcome.stages, backend)
        status = "FINISHED"
    finally:
        tracker.finish_run(job_run_id, status)
    return outcome


def run_stage(job: JobConfig, name: str, tracker, job_run_id: str, datasets: Datasets,
              done: dict[str, StageOutcome], backend: Backend) -> StageOutcome:
    plan = resolve_stage(job, name, datasets, done, tracker, strict=True)
    if plan.cached is not None:
        logger.info("stage %s: skipped, fingerprint %s already finished in MLflow run %s",
                    name, plan.fingerprint[:12], plan.cached.run_id)
        tracker.set_tags(job_run_id, {f"pipeline.{name}.reused_run_id": plan.cached.run_id})
        return plan.cached
    run_id = open_stage_run(tracker, job_run_id, job, plan, datasets)
    try:
        result = backend.launch(job, plan, StageLaunch(name, run_id, plan.inputs, plan.output_url, tracker))
        record_result(tracker, run_id, name, result, job)
    except BaseException:
        tracker.finish_run(run_id, "FAILED")
        raise
    tracker.finish_run(run_id, "FINISHED")
    return StageOutcome(name, plan.fingerprint, run_id, result, skipped=False)


def open_stage_run(tracker, job_run_id: str, job: JobConfig, plan: StagePlan, datasets: Datasets) -> str:
    """The stage's child run, with its params, dataset inputs and lineage tags."""
    name = plan.stage
    params = flatten_params(STAGES[name].settings(job), prefix=f"stages.{name}")
    run_id = tracker.start_stage_run(job_run_id, name, plan.fingerprint, params=params)
    for i, (role, url) in enumerate(plan.inputs.manifests.items()):  # the first role is what it learned from
        tracker.log_dataset(run_id, url, datasets.digests[role], context=role, primary=i == 0)
    upstream = plan.upstream
    if upstream is not None:
        tags = {lineage.UPSTREAM_ARTIFACT_URI: upstream.url}
        if upstream.run_id:
            tags[lineage.UPSTREAM_RUN_ID] = upstream.run_id
        if upstream.reference:
            tags[lineage.UPSTREAM_REFERENCE] = upstream.reference
        tracker.set_tags(run_id, tags)
    return run_id


def record_result(tracker, run_id: str, name: str, result: StageResult, job: JobConfig) -> None:
    """The export as an artifact and the tags that make it cacheable; register a classifier.

    The stage itself logged its metrics, images and reports (rank 0), so nothing is logged twice."""
    tags = {}
    if result.export_url:
        tags[lineage.EXPORT_URL] = result.export_url
        tracker.log_artifacts(run_id, result.export_url, "export")
    if result.export_digest:
        tags[lineage.EXPORT_DIGEST] = result.export_digest
    if tags:
        tracker.set_tags(run_id, tags)
    if STAGES[name].registers_model and result.export_url:
        version = tracker.register_classifier(
            run_id, result.export_url, job.mlflow.registered_model,
            description=f"Spikformer classifier finetuned by job {job.name}, MLflow run {run_id}",
        )
        tracker.set_tags(run_id, {"pipeline.registered_model": f"{version.name}/{version.version}"})
