"""Stage 3: evaluate a classifier export on the validation stream, every sample exactly once.

- Model: the export in stages.evaluate.export, else the upstream (finetune) export, rebuilt from its
  config.json and loaded strictly; T = stages.evaluate.T, else the export's T (the finetune T).
- Counting: the eval stream deals each sample to exactly one rank and pads with label -1 so ranks
  yield equal batch counts; padding is dropped, counts and the confusion matrix are all-reduced, and
  the total must equal the manifest's num_samples (else PipelineError).
- Outputs (rank 0, in ctx.output_url): eval_report.json (top-1/top-5, per-class accuracy, confusion
  matrix for <= 100 classes, energy report) and confusion_matrix.png, both also logged as artifacts.
- Energy: models.energy on the first `energy_batches` batches of rank 0 (padding dropped) at the
  evaluated T: per-layer firing rates, SOPs and pJ per image (Spikformer paper, App. C.2).
Metrics (fractions, not percent): top1, top5, n_samples, energy_pj_per_image, sops_per_image, ...
"""

from __future__ import annotations

import json
import logging
import os
import time

import timm
import torch

import models  # noqa: F401  (registers the Spikformer variants with timm)
from models.energy import measure_energy
from pipeline.config import JobConfig
from pipeline.errors import PipelineError
from pipeline.stages.common import manifest_url
from pipeline.stages.context import StageContext, StageInputs, StageResult
from pipeline.train import collectives
from pipeline.train.artifacts import publish
from pipeline.train.distributed import setup_distributed
from pipeline.train.export import read_export

logger = logging.getLogger(__name__)

MATRIX_IN_JSON_MAX_CLASSES = 100


def load_classifier(url: str) -> tuple[torch.nn.Module, dict]:
    state, config = read_export(url)
    try:
        model = timm.create_model(config["variant"], **config["kwargs"])
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise PipelineError(f"{url}: cannot rebuild the classifier from its config.json: {err}") from None
    if getattr(model, "num_classes", 0) <= 0:
        raise PipelineError(f"{url}: the export has no classifier head (an encoder export?); "
                            "evaluate a finetune export")
    return model, config


def check_count(counted: int, expected: int, url: str) -> None:
    if counted != expected:
        raise PipelineError(
            f"{url}: evaluated {counted} samples across all ranks, but the manifest lists {expected}: "
            "the eval stream lost or duplicated samples"
        )


@torch.no_grad()
def evaluate_stream(model: torch.nn.Module, loader, device: torch.device, num_classes: int, energy_batches: int):
    """(confusion [C, C] int64, top-5 hits, batches kept for the energy report) for this rank."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    top5_hits = torch.zeros((), dtype=torch.int64)
    k = min(5, num_classes)
    kept: list[torch.Tensor] = []
    for images, labels in loader:
        real = labels >= 0
        if not real.any():
            continue
        images, labels = images[real], labels[real]
        if int(labels.max()) >= num_classes:
            raise PipelineError(f"label {int(labels.max())} in the eval data, but the model has {num_classes} classes")
        logits = model(images.to(device)).float().cpu()
        confusion += torch.bincount(labels * num_classes + logits.argmax(dim=1),
                                    minlength=num_classes * num_classes).reshape(num_classes, num_classes)
        top5_hits += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        if len(kept) < energy_batches:
            kept.append(images)
    return confusion, top5_hits, kept


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = confusion.shape[0]
    rows = confusion.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(6, 5.5), dpi=100)
    image = ax.imshow((confusion / rows).numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    if n <= 30:
        ax.set_xticks(range(n), classes[:n], rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), classes[:n])
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if confusion[i, j]:
                        ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if confusion[i, j] > rows[i, 0] / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(job: JobConfig, inputs: StageInputs, ctx: StageContext) -> StageResult:
    settings = job.stages.evaluate
    started = time.perf_counter()
    rank, world_size = setup_distributed(ctx)
    export_url = inputs.upstream_export  # the runner resolved stages.evaluate.export (or this job's finetune)
    if not export_url:
        raise PipelineError("stages.evaluate: no classifier to evaluate: set stages.evaluate.export or enable finetune")
    role = "eval" if settings.split == "val" else "train"
    data_url = manifest_url(inputs, role, "evaluate")

    model, config = load_classifier(export_url)
    model.T = settings.T or int(config["kwargs"].get("T") or job.stages.finetune.T)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval()
    num_classes = model.num_classes
    img_size = int(config["kwargs"].get("img_size", job.model.img_size))

    from pipeline.data.stream import build_loader

    augment = job.stages.finetune.augment  # eval transform: the finetune recipe's crop_pct and interpolation
    loader = build_loader(data_url, "eval", batch_size=settings.batch_size, img_size=img_size, rank=rank,
                          world_size=world_size, num_workers=job.data.loader_workers, seed=job.seed,
                          augment={"crop_pct": augment.crop_pct, "interpolation": augment.interpolation},
                          on_error=job.data.on_error, decode=job.data.decode)
    confusion, top5_hits, energy_images = evaluate_stream(model, loader, device, num_classes, settings.energy_batches)
    totals = torch.cat([confusion.flatten(), top5_hits.view(1)])
    totals = collectives.all_reduce_sum(totals)  # on the group's device: NCCL refuses CPU tensors
    confusion, top5_hits = totals[:-1].view(num_classes, num_classes), int(totals[-1])
    counted = int(confusion.sum())
    check_count(counted, loader.num_samples, data_url)

    correct = confusion.diag()
    per_class_count = confusion.sum(dim=1)
    classes = list(config.get("classes") or loader.classes)
    classes += [str(i) for i in range(len(classes), num_classes)]
    metrics = {"top1": float(correct.sum()) / counted, "top5": top5_hits / counted, "n_samples": float(counted),
               "T": float(model.T)}

    if rank == 0:
        # rank 0 always has samples: the stream deals shards from rank 0 on, and padding only fills up
        energy = measure_energy(model, [b.to(device) for b in energy_images])
        metrics.update(energy_pj_per_image=energy.total_pj, energy_mj_per_image=energy.total_mj,
                       sops_per_image=energy.total_sops,
                       mean_firing_rate=sum(energy.firing_rates.values()) / max(len(energy.firing_rates), 1))
        metrics["eval_seconds"] = time.perf_counter() - started
        report = {
            "export": export_url, "export_digest": config.get("weights_sha256"), "variant": config["variant"],
            "T": model.T, "dataset_manifest": data_url, "dataset_digest": loader.manifest.digest,
            "split": settings.split, "world_size": world_size, "metrics": metrics,
            "per_class": {
                name: {"accuracy": float(correct[i]) / max(int(per_class_count[i]), 1),
                       "count": int(per_class_count[i])}
                for i, name in enumerate(classes)
            },
            "energy": energy.to_dict(), "energy_table": energy.to_markdown(),
        }
        if num_classes <= MATRIX_IN_JSON_MAX_CLASSES:
            report["confusion_matrix"] = confusion.tolist()
        local = os.path.join(ctx.work_dir, "artifacts")
        os.makedirs(local, exist_ok=True)
        report_path, matrix_path = os.path.join(local, "eval_report.json"), os.path.join(local, "confusion_matrix.png")
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
        plot_confusion(confusion, classes, matrix_path,
                       f"{config['variant']} T={model.T}: top-1 {metrics['top1']:.2%} ({counted} images)")
        publish(ctx, artifacts=[report_path], images=[matrix_path], metrics=metrics)
        logger.info("evaluate: top-1 %.4f top-5 %.4f over %d images; %.0f pJ/image", metrics["top1"],
                    metrics["top5"], counted, energy.total_pj)
    ctx.report(metrics, None)
    return StageResult(metrics=metrics)
