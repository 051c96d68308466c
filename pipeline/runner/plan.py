"""`plan`: the runner's resolution without the launch — fingerprints and what would be skipped."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline import tracking
from pipeline.config import JobConfig
from pipeline.errors import PipelineError
from pipeline.runner.datasets import resolve_datasets
from pipeline.runner.preflight import check_settings, input_problems
from pipeline.runner.resolve import StageOutcome, resolve_stage, selected_stages

logger = logging.getLogger(__name__)


@dataclass
class PlannedStage:
    stage: str
    fingerprint: str | None
    status: str  # "skip (finished run ...)", "run", "run (fingerprint known once its inputs exist)"


def plan_job(job: JobConfig, only: list[str] | None = None,
             unchecked: list[str] | None = None) -> list[PlannedStage]:
    """What `run` would do now, without starting Ray, writing shards or training.

    Each input the spec names that cannot be checked from here (a manifest or export that cannot be
    read, a reference the MLflow store does not know or cannot be asked about) is appended to
    `unchecked` (the `plan` command lists them all and exits 2 after printing the plan), or logged
    as a warning when no list is given (a sweep's scheduling)."""
    stages = selected_stages(job, only)
    check_settings(job, stages)  # before MLflow: a wrong variant or model setting fails in seconds
    store_problem = None
    try:
        tracker = tracking.prepare(job.mlflow)
    except PipelineError as err:  # a plan is still useful from a laptop that cannot see the cluster's MLflow
        logger.warning("cache status unknown: %s", err)
        tracker, store_problem = None, err
    problems = input_problems(job, stages, tracker, require_store=True)
    if store_problem is not None and any("needs the MLflow store" in p for p in problems):
        problems.append(f"the MLflow store: {store_problem}")
    for problem in problems:
        if unchecked is None:
            logger.warning("input not checked: %s", problem)
        else:
            unchecked.append(problem)
    datasets = resolve_datasets(job, build=False)
    done: dict[str, StageOutcome] = {}
    planned: list[PlannedStage] = []
    for name in stages:
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
