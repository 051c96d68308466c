"""A stage's inputs, fingerprint and cache status: what `run` acts on and what `plan` prints.

The fingerprint hashes everything that changes the stage's result (its settings, the model, the seed,
the loader's dealing of shards and, for training stages, DeepSpeed settings and the world size) and
the digests of what it reads (dataset manifests, upstream export). A FINISHED MLflow run with that
fingerprint means the stage is done: it is skipped and its outputs are reused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline import lineage
from pipeline.config import JobConfig, resolved_dict
from pipeline.data.fsutil import absolute_url, join_url
from pipeline.errors import PipelineError
from pipeline.fingerprint import stage_fingerprint
from pipeline.references import export_exists, resolve_export
from pipeline.runner.datasets import Datasets
from pipeline.stages.context import StageInputs, StageResult
from pipeline.stages.table import STAGES, StageSpec

logger = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    """A stage that ran or was reused: what the next stage and the summary need."""

    stage: str
    fingerprint: str
    run_id: str | None
    result: StageResult
    skipped: bool


@dataclass
class Upstream:
    url: str
    digest: str
    run_id: str | None  # the run that wrote it, when known
    reference: str | None  # what the spec said; None: this job's upstream stage


@dataclass
class StagePlan:
    stage: str
    inputs: StageInputs
    upstream: Upstream | None
    fingerprint: str | None  # None: not known yet (plan only: inputs do not exist yet)
    cached: StageOutcome | None = None
    output_url: str = ""
    trial_name: str = ""
    unknown: str = ""  # why the fingerprint is not known (plan only)


def selected_stages(job: JobConfig, only: list[str] | None) -> list[str]:
    if only:
        unknown = [s for s in only if s not in STAGES]
        if unknown:
            raise PipelineError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
        return [s for s in STAGES if s in only]
    return [s for s in STAGES if STAGES[s].settings(job).enabled]


def stage_settings(job: JobConfig, spec: StageSpec) -> dict[str, Any]:
    """Everything that changes a stage's result (not where it logs or how often)."""
    settings = {
        "stage": resolved_dict(spec.settings(job)),
        "model": resolved_dict(job.model),
        "seed": job.seed,
        "data": {"loader_workers": job.data.loader_workers, "on_error": job.data.on_error},
    }
    if spec.trains:
        settings["deepspeed"] = resolved_dict(job.deepspeed)
        settings["world_size"] = job.scaling.num_workers
    return settings


def resolve_stage(job: JobConfig, name: str, datasets: Datasets, done: dict[str, StageOutcome], tracker,
                  *, strict: bool) -> StagePlan:
    """strict (run): every input must exist, else PipelineError; not strict (plan): unknowns are noted."""
    spec = STAGES[name]
    roles = spec.roles(job)
    missing = [role for role in roles if role not in datasets.manifests]
    if missing:
        raise PipelineError(f"stage {name} needs dataset role(s) {missing}: set data.train/val/pretrain or data.build")
    inputs = StageInputs(manifests={role: datasets.manifests[role] for role in roles})
    digests = {role: datasets.digests[role] for role in roles if role in datasets.digests}
    plan = StagePlan(name, inputs, None, None)
    if len(digests) < len(roles):
        plan.unknown = "its dataset does not exist yet"
    if spec.needs_upstream(job):
        try:
            plan.upstream = _upstream(job, spec, done, tracker, pending_ok=not strict)
        except PipelineError:
            if strict:
                raise
            plan.unknown = plan.unknown or "its upstream export does not exist yet"
        if plan.upstream is None and not plan.unknown:
            plan.unknown = "its upstream export is known once the upstream stage ran"
        if plan.upstream is not None:
            inputs.upstream_export = plan.upstream.url
            digests["upstream"] = plan.upstream.digest
    if plan.unknown:
        if strict:
            raise PipelineError(f"stage {name}: {plan.unknown}")
        return plan
    plan.fingerprint = stage_fingerprint(name, stage_settings(job, spec), digests)
    plan.output_url = join_url(absolute_url(job.output_root), f"{name}-{plan.fingerprint[:12]}")
    plan.trial_name = f"{job.name}-{name}-{plan.fingerprint[:12]}"
    if tracker is not None:
        cached = tracker.find_finished_stage(name, plan.fingerprint)
        export = cached.data.tags.get(lineage.EXPORT_URL) if cached is not None else None
        if export and not export_exists(export):  # its outputs were deleted since: run it again
            logger.warning("stage %s: finished run %s has no export at %s any more; running it again",
                           name, cached.info.run_id, export)
            cached = None
        if cached is not None:
            tags = cached.data.tags
            result = StageResult(export_url=tags.get(lineage.EXPORT_URL) or None,
                                 export_digest=tags.get(lineage.EXPORT_DIGEST) or None,
                                 metrics=dict(cached.data.metrics))
            plan.cached = StageOutcome(name, plan.fingerprint, cached.info.run_id, result, skipped=True)
    return plan


def _upstream(job: JobConfig, spec: StageSpec, done: dict[str, StageOutcome], tracker,
              pending_ok: bool) -> Upstream | None:
    """The export the stage consumes: named in the spec, or this job's upstream stage's; None when that
    stage has not run yet in a plan. PipelineError when nothing can provide it."""
    from pipeline.train.export import export_digest

    reference = spec.upstream_reference(job)
    if reference:
        found = resolve_export(reference, spec.upstream_key, spec.upstream, tracker, absolute_url(job.output_root))
        return Upstream(found.url, export_digest(found.url), found.run_id, reference)
    before = done.get(spec.upstream)
    if before is not None and before.result.export_url:
        return Upstream(before.result.export_url, before.result.export_digest, before.run_id, None)
    if pending_ok and spec.upstream in selected_stages(job, None) and spec.upstream not in done:
        return None  # plan: it would run first
    raise PipelineError(f"stage {spec.name} needs the {spec.upstream} export: run {spec.upstream} in the same job, "
                        f"or set {spec.upstream_key} (an export URL, runs:/, models:/ or job: reference)")
