"""Stage: linear probe of a frozen encoder (MAE's protocol), an SSL health check after pretraining.

- Encoder: the pretrain export (or `stages.probe.init`: an export URL, runs:/, models:/ or job:
  reference; a classifier export's head is dropped), rebuilt from its config.json at `stages.probe.T`,
  loaded strictly and frozen: eval mode always (running BatchNorm statistics as exported, no drop
  path), no gradients, its pooled features computed under no_grad.
- Head: BatchNorm1d(affine=False, eps 1e-6) then Linear (weights trunc-normal std 0.01, bias 0),
  MAE's linear probe; the only trained parameters.
- Optimizer: torch AdamW through the DeepSpeed engine, no weight decay, lr = base_lr x global batch
  / 256 with warmup and cosine (MAE uses LARS, base lr 0.1; the engine has no LARS, and AdamW needs no
  batch-size-specific tuning at the small batches this project runs). Augmentation: RandomResizedCrop
  + flip (MAE's), from `stages.probe.augment`.
- Why the shared StageTrainer (DeepSpeed) rather than a plain torch loop: the head is tiny, but the
  stage then resumes from checkpoints after a Ray restart, reports and logs like every other stage,
  and under ZeRO-3 the frozen 172M encoder is partitioned across ranks like in the other stages,
  instead of a full copy per GPU; what it costs is only the engine's bookkeeping around a linear layer.
- Result: top-1/top-5 over every val sample exactly once (the evaluate stage's counting: padding
  dropped, counts all-reduced, total checked against the manifest), as metrics `top1`, `top5`,
  `n_samples`; the probe is evaluated as the plain classifier it exports.
- Export (`{output_url}/export`): that classifier, the encoder plus the BatchNorm folded into the
  Linear (exact in eval mode: w' = w / sqrt(var + eps), b' = b - w' mean), under the Spikformer's own
  names, so `evaluate` (stages.evaluate.export: runs:/<probe run>/export) or timm can load it strictly.
"""

from __future__ import annotations

import logging

import timm
import torch
from torch import nn

import models  # noqa: F401  (registers the Spikformer variants with timm)
from pipeline.config import JobConfig, ProbeSettings
from pipeline.data.manifest import load_manifest
from pipeline.errors import PipelineError
from pipeline.stages.common import augment_options, eval_loader, manifest_url, model_kwargs
from pipeline.stages.context import StageContext, StageInputs, StageResult
from pipeline.stages.evaluate import check_count, evaluate_stream
from pipeline.train import collectives
from pipeline.train.distributed import seed_everything, setup_distributed
from pipeline.train.export import read_export
from pipeline.train.trainer import StageTrainer

logger = logging.getLogger(__name__)

HEAD_PREFIX = "head."
BN_EPS = 1e-6  # MAE's probe BatchNorm


class LinearProbe(nn.Module):
    """A frozen encoder (features [B, D]) under BatchNorm1d(affine=False) + Linear."""

    def __init__(self, encoder: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=BN_EPS)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.encoder.eval()

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()  # frozen: running statistics as exported, no drop path, whatever the engine asks
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.encoder(images)
        return self.head(self.norm(features))


def fold_probe_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classifier state_dict (encoder under Spikformer names + folded head) of a LinearProbe state_dict."""
    scale = (state["norm.running_var"].float() + BN_EPS).rsqrt()
    weight = state["head.weight"].float() * scale
    bias = state["head.bias"].float() - weight @ state["norm.running_mean"].float()
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return {**encoder, "head.weight": weight, "head.bias": bias}


def load_encoder(url: str, T: int) -> tuple[nn.Module, dict]:
    """The export's encoder (head dropped) at time steps T, loaded strictly."""
    state, config = read_export(url)
    kwargs = {**config.get("kwargs", {}), "num_classes": 0, "T": T}
    try:
        encoder = timm.create_model(config["variant"], **kwargs)
        encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise PipelineError(f"stages.probe.init: {url}: cannot rebuild the encoder from its config.json: "
                            f"{str(err).splitlines()[0]}") from None
    return encoder, config


def build_probe(job: JobConfig, settings: ProbeSettings, encoder: nn.Module | None = None) -> LinearProbe:
    """The probe module (the job's model variant when no encoder is given: the cost plan's builder)."""
    if encoder is None:
        encoder = timm.create_model(job.model.variant, **model_kwargs(job, settings.T, num_classes=0))
    return LinearProbe(encoder, encoder.embed_dim, job.model.num_classes)


def probe_loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    images, labels = batch
    logits = module(images)
    hits = (logits.argmax(dim=1) == labels).float().mean()
    return nn.functional.cross_entropy(logits, labels), {"train_top1": float(hits)}


def run(job: JobConfig, inputs: StageInputs, ctx: StageContext) -> StageResult:
    settings = job.stages.probe
    rank, world_size = setup_distributed(ctx)
    if not inputs.upstream_export:
        raise PipelineError("stages.probe: no encoder to probe: enable stages.pretrain or set stages.probe.init")
    train_url = manifest_url(inputs, "train", "probe")
    val_url = manifest_url(inputs, "eval", "probe")
    classes = load_manifest(train_url).classes
    if len(classes) > job.model.num_classes:
        raise PipelineError(f"{train_url}: {len(classes)} classes, but model.num_classes is {job.model.num_classes}")

    encoder, source = load_encoder(inputs.upstream_export, settings.T)
    img_size = int(source.get("kwargs", {}).get("img_size", job.model.img_size))
    seed_everything(job.seed)  # the same head initialisation on every rank
    probe = build_probe(job, settings, encoder)
    trainer = StageTrainer(job, settings, ctx, stage="probe", model=probe, loss_fn=probe_loss, manifest_url=train_url,
                           role="train", augment=augment_options(settings.augment))
    trainer.resume()
    trainer.fit()
    trainer.save_final()

    # the probe as one classifier: every rank gets the consolidated state (collective under ZeRO-3)
    state = fold_probe_state(trainer.engine.state_dict_fp32())
    kwargs = {**source.get("kwargs", {}), "num_classes": job.model.num_classes, "T": settings.T}
    config = {"variant": source["variant"], "kwargs": kwargs, "stage": "probe", "kind": "classifier",
              "init": inputs.upstream_export, "encoder_digest": source.get("weights_sha256"), "classes": classes,
              "dataset_manifest": train_url}
    export_url, digest = trainer.export(config, state=state)

    device = trainer.engine.device
    classifier = timm.create_model(source["variant"], **kwargs)
    classifier.load_state_dict(state, strict=True)
    classifier.to(device).eval()
    loader = eval_loader(job, val_url, batch_size=settings.eval_batch_size, rank=rank, world_size=world_size,
                         augment=settings.augment, img_size=img_size)
    confusion, top5_hits, _ = evaluate_stream(classifier, loader, device, job.model.num_classes, energy_batches=0)
    totals = torch.cat([confusion.flatten(), top5_hits.view(1)])
    totals = collectives.all_reduce_sum(totals)
    counted = int(totals[:-1].sum())
    check_count(counted, loader.num_samples, val_url)
    top1 = int(totals[:-1].view(job.model.num_classes, -1).diag().sum())
    metrics = {**trainer.summary_metrics(), "top1": top1 / counted, "top5": int(totals[-1]) / counted,
               "n_samples": float(counted)}
    trainer.finish(metrics, "linear probe loss")
    logger.info("probe: top-1 %.4f top-5 %.4f over %d val images (%d steps), export %s", metrics["top1"],
                metrics["top5"], counted, trainer.engine.step, export_url)
    return StageResult(export_url=export_url, export_digest=digest, metrics=metrics)
