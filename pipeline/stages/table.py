"""The stage table: everything that differs between stages, in one place (torchtitan's TrainSpec idea).

The runner, `plan`, the cost plan and every launcher read `STAGES`; no other list of stage names
exists (the job spec's `stages:` block has one settings class per entry, checked by a test). The
table's order is the pipeline's order.

Per stage:
- `run(job, inputs, ctx) -> StageResult`: the stage itself (pipeline/stages/<name>.py);
- `settings_model`: its block under `stages.<name>` in the job spec;
- `roles(job)`: the dataset roles it reads ("pretrain", "train", "eval"), from its settings;
- `upstream` / `upstream_key` / `upstream_reference(job)`: the stage whose export it consumes, the
  spec key that may name another export instead, and what that key says (None: the upstream
  stage of this job; a URL, `runs:/`, `models:/` or `job:` reference otherwise);
- `needs_upstream(job)`: whether it consumes an export at all (finetune from scratch does not);
- `build_model(job)` and `T(job)`: the module it trains or runs, for the cost plan;
- `trains`: it runs an optimizer, so DeepSpeed settings and the world size change its result;
- `registers_model`: its export is registered in the MLflow model registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import (
    EvaluateSettings,
    FinetuneSettings,
    JobConfig,
    PretrainSettings,
    ProbeSettings,
)
from pipeline.schema import Settings
from pipeline.stages import evaluate, finetune, pretrain, probe
from pipeline.stages.context import StageContext, StageInputs, StageResult

RunFn = Callable[[JobConfig, StageInputs, StageContext], StageResult]


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: RunFn
    settings_model: type[Settings]
    roles: Callable[[JobConfig], tuple[str, ...]]
    build_model: Callable[[JobConfig], torch.nn.Module]
    T: Callable[[JobConfig], int]
    trains: bool = True
    upstream: str | None = None
    upstream_key: str | None = None
    upstream_reference: Callable[[JobConfig], str | None] = lambda job: None
    needs_upstream: Callable[[JobConfig], bool] = lambda job: False
    registers_model: bool = False

    def settings(self, job: JobConfig) -> Settings:
        return getattr(job.stages, self.name)


def _finetune_reference(job: JobConfig) -> str | None:
    init = job.stages.finetune.init
    return None if init in ("pretrain", "scratch") else init


def _pretrain_roles(job: JobConfig) -> tuple[str, ...]:
    # the kNN monitor reads a labelled bank (train) and val; without it pretraining reads only its own data
    return ("pretrain", "train", "eval") if job.stages.pretrain.knn_every_steps else ("pretrain",)


def _probe_reference(job: JobConfig) -> str | None:
    init = job.stages.probe.init
    return None if init == "pretrain" else init


def _evaluate_T(job: JobConfig) -> int:
    return job.stages.evaluate.T or job.stages.finetune.T


def _evaluate_model(job: JobConfig) -> torch.nn.Module:
    settings = job.stages.finetune.model_copy(update={"T": _evaluate_T(job)})
    return finetune.build_classifier(job, settings)


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="pretrain",
            run=pretrain.run,
            settings_model=PretrainSettings,
            roles=_pretrain_roles,
            build_model=lambda job: pretrain.build_mim(job, job.stages.pretrain),
            T=lambda job: job.stages.pretrain.T,
        ),
        StageSpec(
            name="probe",
            run=probe.run,
            settings_model=ProbeSettings,
            roles=lambda job: ("train", "eval"),
            build_model=lambda job: probe.build_probe(job, job.stages.probe),
            T=lambda job: job.stages.probe.T,
            upstream="pretrain",
            upstream_key="stages.probe.init",
            upstream_reference=_probe_reference,
            needs_upstream=lambda job: True,
        ),
        StageSpec(
            name="finetune",
            run=finetune.run,
            settings_model=FinetuneSettings,
            roles=lambda job: ("train",),
            build_model=lambda job: finetune.build_classifier(job, job.stages.finetune),
            T=lambda job: job.stages.finetune.T,
            upstream="pretrain",
            upstream_key="stages.finetune.init",
            upstream_reference=_finetune_reference,
            needs_upstream=lambda job: job.stages.finetune.init != "scratch",
            registers_model=True,
        ),
        StageSpec(
            name="evaluate",
            run=evaluate.run,
            settings_model=EvaluateSettings,
            roles=lambda job: ("eval",) if job.stages.evaluate.split == "val" else ("train",),
            build_model=_evaluate_model,
            T=_evaluate_T,
            trains=False,
            upstream="finetune",
            upstream_key="stages.evaluate.export",
            upstream_reference=lambda job: job.stages.evaluate.export,
            needs_upstream=lambda job: True,
        ),
    )
}
