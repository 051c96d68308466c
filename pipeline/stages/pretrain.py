"""Stage 1: masked-image-modelling pretraining of the Spikformer encoder (models.mim) on DeepSpeed.

Input: the "pretrain" manifest (falls back to "train"; labels are ignored).
Output (in ctx.output_url):
- export/: the encoder under the classifier's parameter names, without a head (config kwargs
  num_classes=0, so `timm.create_model(variant, **kwargs)` loads it strictly); finetune loads it;
- loss_curve.csv / loss_curve.png; reconstruction grids (original / masked / reconstruction) are
  logged every `reconstruction_every_steps` and at the end (ctx.log_image; final one also saved).
- SSL health, with `knn_every_steps` set: the weighted kNN monitor (pipeline.stages.knn) on the
  encoder's pooled features, bank from "train", queries from "eval", logged as knn_top1/knn_top5 at
  step 0 (random encoder), every `knn_every_steps` and at the last step, with BatchNorm statistics
  re-estimated on the bank images (`knn_bn_stats: bank`) or as they run; the summary metrics add
  knn_seconds_total and knn_time_share (its share of this rank's pretraining wall time).
- firing_rate_train/<layer> every `firing_rate_every_steps` and at the last step: the mean spike
  count per element of each LIF output in that step's own training forward (train-mode BatchNorm, the
  masked input; pipeline.train.engine), and the loop's time by section, time/<section> (knn and
  reconstruction among them; pipeline.train.timers).
The encoder is built with the pretraining T (default 1) and no head, so no frozen parameter sits in
the DeepSpeed engine.
"""

from __future__ import annotations

import logging
import os

import timm
import torch

import models  # noqa: F401  (registers the Spikformer variants with timm)
from models.mim import MaskedImageModel, reconstruction_grid
from pipeline.config import JobConfig, PretrainSettings
from pipeline.errors import PipelineError
from pipeline.stages.common import augment_options, manifest_url, model_kwargs, normalization
from pipeline.stages.context import StageContext, StageInputs, StageResult
from pipeline.stages.knn import build_monitor
from pipeline.train.distributed import seed_everything
from pipeline.train.trainer import StageTrainer, TrainingHooks

logger = logging.getLogger(__name__)

GRID_IMAGES = 8


def build_mim(job: JobConfig, settings: PretrainSettings) -> MaskedImageModel:
    encoder = timm.create_model(job.model.variant, **model_kwargs(job, settings.T, num_classes=0))
    try:
        return MaskedImageModel(
            encoder, patch_size=settings.patch_size, mask_ratio=settings.mask_ratio,
            decoder_dim=settings.decoder_dim, decoder_depth=settings.decoder_depth,
            decoder_heads=settings.decoder_heads, norm_pix_loss=settings.norm_pix_loss,
        )
    except ValueError as err:
        raise PipelineError(f"stages.pretrain: {err}") from None


def mim_loss(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, _labels = batch
    loss, _pred, _mask = module(images)
    return loss


class ReconstructionGrids:
    """Draws original / masked / reconstructed images with a fixed mask seed, so grids compare over time."""

    def __init__(self, trainer: StageTrainer, mim: MaskedImageModel, mean, std, seed: int) -> None:
        self.trainer, self.mim, self.mean, self.std, self.seed = trainer, mim, mean, std, seed

    @torch.no_grad()
    def draw(self, images: torch.Tensor):
        """Every rank runs the forward (ZeRO-3 gathers parameters collectively); returns the PIL image."""
        engine = self.trainer.engine
        module = engine.module
        images = images[:GRID_IMAGES].to(engine.device, engine.compute_dtype)
        generator = torch.Generator().manual_seed(self.seed)  # leaves the global RNG alone
        mask = self.mim.random_mask(images.shape[0], images.device, generator=generator)
        was_training = module.training
        module.eval()
        try:
            _loss, pred, mask = module(images, mask=mask)
        finally:
            module.train(was_training)
        scale = max(1, 128 // images.shape[-1])  # small inputs (digits: 32 px) drawn 4x larger
        return reconstruction_grid(images, pred, mask, self.mim.patch_size, self.mean, self.std,
                                   max_images=GRID_IMAGES, norm_pix_loss=self.mim.norm_pix_loss, scale=scale)

    def log(self, images: torch.Tensor, name: str):
        picture = self.draw(images)
        if self.trainer.rank == 0:
            self.trainer.ctx.log_image(picture, name)
        return picture


def run(job: JobConfig, inputs: StageInputs, ctx: StageContext) -> StageResult:
    settings = job.stages.pretrain
    url = manifest_url(inputs, "pretrain", "pretrain", fallback="train")
    seed_everything(job.seed)  # identical initial weights on every rank
    mim = build_mim(job, settings)
    augment = augment_options(settings.augment)
    mean, std = normalization("pretrain", augment)

    hooks = TrainingHooks()
    trainer = StageTrainer(job, settings, ctx, stage="pretrain", model=mim, loss_fn=mim_loss, manifest_url=url,
                           role="pretrain", augment=augment, hooks=hooks)
    grids = ReconstructionGrids(trainer, mim, mean, std, seed=job.seed)
    last_images: list[torch.Tensor] = []
    engine = trainer.engine
    estimate_bn = settings.knn_bn_stats == "bank"
    monitor = None if not settings.knn_every_steps else build_monitor(
        job, settings, inputs, engine.module.encoder, rank=trainer.rank, world_size=trainer.world_size,
        device=engine.device, dtype=engine.compute_dtype)

    timer = engine.timer  # the loop's sections (pipeline.train.timers): time/reconstruction, time/knn

    def after_step(out, batch) -> None:
        last_images[:] = [batch[0]]
        if out.step % settings.reconstruction_every_steps == 0:
            with timer.section("reconstruction"):
                grids.log(batch[0], f"reconstruction_step{out.step:07d}.png")
        if monitor is not None and (out.step % settings.knn_every_steps == 0 or engine.finished):
            with timer.section("knn"):
                ctx.log_metrics(monitor.evaluate(out.step, estimate_bn=estimate_bn), out.step)

    hooks.after_step = after_step
    trainer.resume()
    outside_fit = 0.0
    if monitor is not None and engine.step == 0:
        with timer.section("knn"):
            ctx.log_metrics(monitor.evaluate(0, estimate_bn=estimate_bn), 0)  # the random encoder
        outside_fit = monitor.seconds
    trainer.fit()
    trainer.save_final()

    # the encoder under the classifier's names, consolidated (collective under ZeRO-3)
    export_url, digest = trainer.export({
        "variant": job.model.variant, "kwargs": model_kwargs(job, settings.T, num_classes=0), "stage": "pretrain",
        "kind": "encoder", "mask_ratio": settings.mask_ratio, "patch_size": mim.patch_size, "dataset_manifest": url,
    }, prefix="encoder")
    if not last_images:  # resumed after the last step: draw from the epoch's first batch
        last_images.append(trainer.first_batch()[0])
    grid_path = os.path.join(ctx.work_dir, "artifacts", "reconstruction_final.png")
    with timer.section("reconstruction"):
        final_grid = grids.log(last_images[0], "reconstruction_final.png")
    if trainer.rank == 0:
        os.makedirs(os.path.dirname(grid_path), exist_ok=True)
        final_grid.save(grid_path)
    metrics = trainer.summary_metrics()
    if monitor is not None:
        metrics.update(knn_seconds_total=monitor.seconds,
                       knn_time_share=monitor.seconds / max(trainer.train_seconds + outside_fit, 1e-9))
    trainer.finish(metrics, "MIM pretraining loss", outputs=[grid_path])
    logger.info("pretrain done: %d steps, final loss %.4f, export %s", trainer.engine.step, metrics["final_loss"],
                export_url)
    return StageResult(export_url=export_url, export_digest=digest, metrics=metrics)
