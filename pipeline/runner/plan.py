"""`plan`: the runner's resolution without the launch — fingerprints and what would be skipped."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline import tracking
from pipeline.config import JobConfig
from pipeline.errors import PipelineError
from pipeline.runner.datasets import resolve_datasets
from pipeline.runner.preflight import check_job
from pipeline.runner.resolve import StageOutcome, resolve_stage, selected_stages

logger = logging.getLogger(__name__)


@dataclass
class PlannedStage:
    stage: str
    fingerprint: str | None
    status: str  # "skip (finished run ...)", "run", "run (fingerprint known once its inputs exist)"


def plan_job(job: JobConfig, only: list[str] | None = None) -> list[PlannedStage]:
    """What `run` would do now, without starting Ray, writing shards or training."""
    check_job(job, selected_stages(job, only), strict_inputs=False)  # before MLflow: references are resolved below
    try:
        tracker = tracking.prepare(job.mlflow)
    except PipelineError as err:  # a plan is still useful from a laptop that cannot see the cluster's MLflow
        logger.warning("cache status unknown: %s", err)
        tracker = None
    datasets = resolve_datasets(job, build=False)
    done: dict[str, StageOutcome] = {}
    planned: list[PlannedStage] = []
    for name in selected_stages(job, only):
        plan = resolve_stage(job, name, datasets, done, tracker, strict=False)
        if plan.fingerprint is None:
            planned.append(PlannedStage(name, None, "run (fingerprint known once its inputs exist)"))
        elif tracker is None:
            planned.append(PlannedStage(name, plan.fingerprint, "run unless MLflow holds it (MLflow unreachable)"))
        elif plan.cached is not None:
            planned.append(PlannedStage(name, plan.fingerprint, f"skip (finished run {plan.cached.run_id})"))
            done[name] = plan.cached
        else:
            planned.append(PlannedStage(name, plan.fingerprint, "run"))
    return planned
