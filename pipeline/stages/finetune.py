"""Stage 2: supervised finetuning of the Spikformer classifier on DeepSpeed.

Recipe (all from timm, switched by stages.finetune): the classifier `job.model` with drop_path and
T; initial weights from the pretrain export (init "pretrain"), an explicit export folder or
.safetensors URL, or scratch; Mixup/CutMix with SoftTargetCrossEntropy (label smoothing inside
Mixup), or LabelSmoothingCrossEntropy when both are off; RandAugment and random erasing through the
stream's augment options; layer-wise lr decay through the optimizer settings; optional EMA
(ModelEmaV3) whose weights are exported instead of the live ones.

Loading an encoder is strict: every non-head key of the classifier must be in the export with the
same shape, and the export must hold nothing else (besides a head, which is ignored), otherwise a
PipelineError lists the missing, unexpected and mis-shaped keys.

label_fraction < 1 streams a class-balanced subset of the train set (pipeline.stages.label_subset),
written once by rank 0 into {output_url}/label_subset.

Output: {output_url}/export (the classifier, fp32 safetensors + config with the class names).
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec
import timm
import torch
from safetensors.torch import load as load_safetensors
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

import models  # noqa: F401  (registers the Spikformer variants with timm)
from pipeline.config import FinetuneSettings, JobConfig
from pipeline.data.fsutil import join_url
from pipeline.data.manifest import load_manifest
from pipeline.errors import PipelineError
from pipeline.stages.common import augment_options, manifest_url, model_kwargs
from pipeline.stages.context import StageContext, StageInputs, StageResult
from pipeline.stages.label_subset import write_label_subset
from pipeline.train.collectives import barrier, broadcast_from_rank0
from pipeline.train.distributed import seed_everything, setup_distributed
from pipeline.train.export import read_export
from pipeline.train.trainer import StageTrainer, TrainingHooks

logger = logging.getLogger(__name__)

HEAD_PREFIX = "head."
_LISTED = 8  # keys named per category in a mismatch error


# --------------------------------------------------------------------------- model and initial weights


def build_classifier(job: JobConfig, settings: FinetuneSettings) -> torch.nn.Module:
    kwargs = {**model_kwargs(job, settings.T), "drop_path_rate": settings.drop_path}
    return timm.create_model(job.model.variant, **kwargs)


def init_source(settings: FinetuneSettings, upstream_export: str | None) -> str | None:
    """The URL to load initial weights from (the runner resolved init to it), or None for scratch."""
    if settings.init == "scratch":
        return None
    if not upstream_export:
        raise PipelineError(
            f"stages.finetune.init is {settings.init!r} but no pretrain export was handed over "
            "(enable stages.pretrain, or set init to an export reference or 'scratch')"
        )
    return upstream_export


def read_weights(url: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state_dict, variant or None) from an export folder or a single .safetensors file."""
    if url.endswith(".safetensors"):
        try:
            with fsspec.open(url, "rb") as f:
                return load_safetensors(f.read()), None
        except FileNotFoundError:
            raise PipelineError(f"stages.finetune.init: {url} not found") from None
    state, config = read_export(url)
    return state, config.get("variant")


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f", ... (+{len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def check_encoder_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                       variant: str, source_variant: str | None) -> dict[str, torch.Tensor]:
    """The export's non-head tensors, after checking they match the model's non-head keys exactly."""
    wanted = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    given = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    missing = sorted(set(wanted) - set(given))
    unexpected = sorted(set(given) - set(wanted))
    shapes = sorted(f"{k} (export {tuple(given[k].shape)}, model {tuple(wanted[k])})"
                    for k in set(wanted) & set(given) if given[k].shape != wanted[k])
    if missing or unexpected or shapes:
        problems = [f"{name} [{_listed(keys)}]" for name, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
                    if keys]
        origin = f" (export variant {source_variant})" if source_variant else ""
        raise PipelineError(
            f"stages.finetune.init: {source}{origin} does not fit model.variant {variant}: " + "; ".join(problems)
        )
    return given


def load_initial_weights(model: torch.nn.Module, url: str, variant: str) -> None:
    state, source_variant = read_weights(url)
    encoder = check_encoder_fits(model, state, url, variant, source_variant)
    result = model.load_state_dict(encoder, strict=False)
    assert all(k.startswith(HEAD_PREFIX) for k in result.missing_keys) and not result.unexpected_keys
    logger.info("finetune: loaded %d encoder tensors from %s (head stays freshly initialised)", len(encoder), url)


# --------------------------------------------------------------------------- loss and batches


def build_mixup(settings: FinetuneSettings, num_classes: int) -> Mixup | None:
    if settings.mixup <= 0 and settings.cutmix <= 0:
        return None
    if settings.batch_size % 2:
        raise PipelineError(f"stages.finetune.batch_size must be even with mixup/cutmix (got {settings.batch_size})")
    return Mixup(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, label_smoothing=settings.label_smoothing,
                 num_classes=num_classes)


def build_criterion(settings: FinetuneSettings, mixup: Mixup | None) -> torch.nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # Mixup already smoothed the targets
    if settings.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=settings.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def classifier_loss(criterion: torch.nn.Module):
    def loss_fn(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        images, targets = batch
        logits = module(images)
        hard = targets if targets.dim() == 1 else targets.argmax(dim=1)  # mixed targets: the dominant class
        # a tensor: the engine reads it at log steps (a float() here would wait for the device every step)
        return criterion(logits, targets), {"train_top1": (logits.argmax(dim=1) == hard).float().mean().detach()}

    return loss_fn


# --------------------------------------------------------------------------- EMA


class Ema:
    """timm ModelEmaV3 of the engine's module; the engine gathers ZeRO-3 parameters for each update."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.ema = ModelEmaV3(model, decay=decay)  # built before DeepSpeed partitions anything

    def attach(self, trainer: StageTrainer) -> None:
        self.trainer = trainer
        self.ema.module.to(trainer.engine.device)

    def update(self, out, _batch) -> None:
        engine = self.trainer.engine
        with engine.gathered_parameters():
            self.ema.update(engine.module, step=out.step)

    def state(self) -> dict[str, Any]:
        return {"ema": {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        if "ema" not in state:
            raise PipelineError("stages.finetune.ema is enabled, but the checkpoint has no EMA weights")
        self.ema.module.load_state_dict(state["ema"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()


# --------------------------------------------------------------------------- the stage


def labelled_manifest(url: str, settings: FinetuneSettings, seed: int, ctx: StageContext) -> str:
    """The train manifest, or with label_fraction < 1 its class-balanced subset (written once, by rank 0)."""
    if settings.label_fraction < 1:
        subset = None
        if ctx.rank == 0:
            subset = write_label_subset(url, settings.label_fraction, seed, join_url(ctx.output_url, "label_subset"))
        url = broadcast_from_rank0(subset)
    barrier()
    return url


def run(job: JobConfig, inputs: StageInputs, ctx: StageContext) -> StageResult:
    settings = job.stages.finetune
    setup_distributed(ctx)
    url = labelled_manifest(manifest_url(inputs, "train", "finetune"), settings, job.seed, ctx)
    classes = load_manifest(url).classes
    if len(classes) > job.model.num_classes:
        raise PipelineError(f"{url}: {len(classes)} classes, but model.num_classes is {job.model.num_classes}")

    seed_everything(job.seed)  # identical initial weights on every rank
    model = build_classifier(job, settings)
    source = init_source(settings, inputs.upstream_export)
    if source is not None:
        load_initial_weights(model, source, job.model.variant)
    ema = Ema(model, settings.ema.decay) if settings.ema.enabled else None
    mixup = build_mixup(settings, job.model.num_classes)
    criterion = build_criterion(settings, mixup)

    hooks = TrainingHooks(prepare=(lambda images, labels: mixup(images, labels)) if mixup else None)
    if ema is not None:
        hooks.after_step, hooks.state, hooks.load_state = ema.update, ema.state, ema.load_state
    trainer = StageTrainer(job, settings, ctx, stage="finetune", model=model, loss_fn=classifier_loss(criterion),
                           manifest_url=url, role="train", augment=augment_options(settings.augment), hooks=hooks)
    if ema is not None:
        ema.attach(trainer)
    trainer.resume()
    trainer.fit()
    trainer.save_final()

    export_url, digest = trainer.export({
        "variant": job.model.variant, "kwargs": model_kwargs(job, settings.T), "stage": "finetune",
        "kind": "classifier", "init": source or "scratch", "ema": settings.ema.enabled,
        "label_fraction": settings.label_fraction, "classes": classes, "dataset_manifest": url,
    }, state=ema.state_dict() if ema is not None else None)
    metrics = trainer.summary_metrics()
    trainer.finish(metrics, "finetune loss")
    logger.info("finetune done: %d steps, final loss %.4f, export %s", trainer.engine.step, metrics["final_loss"],
                export_url)
    return StageResult(export_url=export_url, export_digest=digest, metrics=metrics)
