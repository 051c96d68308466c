"""What the stages share besides the training loop (pipeline.train.trainer): which manifest a role
reads, settings -> loader options, the eval stream, and the model kwargs an export records."""

from __future__ import annotations

from typing import Any

from pipeline.config import AugmentSettings, JobConfig
from pipeline.errors import PipelineError
from pipeline.stages.context import StageInputs


def manifest_url(inputs: StageInputs, role: str, stage: str, fallback: str | None = None) -> str:
    url = inputs.manifests.get(role) or (inputs.manifests.get(fallback) if fallback else None)
    if not url:
        wanted = f"'{role}'" + (f" or '{fallback}'" if fallback else "")
        raise PipelineError(
            f"stage {stage}: no {wanted} dataset manifest in the stage inputs "
            f"(got roles {sorted(inputs.manifests)}); set data.train/data.val/data.pretrain or data.build"
        )
    return url


def augment_options(augment: AugmentSettings) -> dict[str, Any]:
    """AugmentSettings -> the `augment` dict of pipeline.data.stream.build_loader (timm options)."""
    return augment.model_dump(mode="python")


def eval_loader(job: JobConfig, url: str, *, batch_size: int, rank: int, world_size: int,
                augment: AugmentSettings | None = None, img_size: int | None = None, workers: int | None = None):
    """The eval stream of `url` for this rank: centre crop (`augment`'s crop_pct and interpolation), every
    sample dealt to exactly one rank, padding label -1; batches normalised on this process's device."""
    from pipeline.data.stream import build_loader

    options = None if augment is None else {"crop_pct": augment.crop_pct, "interpolation": augment.interpolation}
    return build_loader(url, "eval", batch_size=batch_size, img_size=img_size or job.model.img_size, rank=rank,
                        world_size=world_size, num_workers=job.data.loader_workers if workers is None else workers,
                        seed=job.seed, augment=options,
                        on_error=job.data.on_error, decode=job.data.decode)


def normalization(role: str, augment: dict[str, Any] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the loader normalises with, to undo it in pictures."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from pipeline.data.transforms import transform_options

    options = transform_options(role, augment)
    return tuple(options.get("mean") or IMAGENET_DEFAULT_MEAN), tuple(options.get("std") or IMAGENET_DEFAULT_STD)


def model_kwargs(job: JobConfig, T: int, **extra: Any) -> dict[str, Any]:
    """create_model kwargs of the job's model (what an export's config.json records)."""
    return {"img_size": job.model.img_size, "num_classes": job.model.num_classes, "T": T,
            **job.model.kwargs, **extra}
