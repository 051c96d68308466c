"""timm `create_transform` pipelines per role, with the recipe defaults of pipeline/config.py (MAE-style crops).

- pretrain: RandomResizedCrop(scale 0.2-1) + horizontal flip, no colour jitter (MAE/SparK style);
- train: RandomResizedCrop + flip + RandAugment "rand-m9-mstd0.5-inc1" + random erasing 0.25
  (DeiT/BEiT finetuning style);
- eval: resize to img_size / crop_pct and centre crop.

`augment` (a dict of create_transform keyword arguments, e.g. from the job's AugmentSettings)
overrides these defaults key by key; unknown keys are a PipelineError naming the key.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import PipelineError

ROLES = ("pretrain", "train", "eval")

ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {
        "scale": (0.2, 1.0),
        "ratio": (3 / 4, 4 / 3),
        "hflip": 0.5,
        "color_jitter": None,
        "auto_augment": None,
        "re_prob": 0.0,
        "interpolation": "bicubic",
    },
    "train": {
        "scale": (0.08, 1.0),
        "ratio": (3 / 4, 4 / 3),
        "hflip": 0.5,
        "color_jitter": None,
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "re_prob": 0.25,
        "re_mode": "pixel",
        "re_count": 1,
        "interpolation": "bicubic",
    },
    "eval": {"interpolation": "bicubic", "crop_pct": 0.875},
}

_RESERVED = {"input_size", "is_training", "separate", "use_prefetcher", "naflex", "patchify"}


def transform_options(role: str, augment: Mapping[str, Any] | None) -> dict[str, Any]:
    """The create_transform keyword arguments for `role`: role defaults updated by `augment`."""
    from timm.data import create_transform

    if role not in ROLES:
        raise PipelineError(f"unknown data role {role!r}; use one of {', '.join(ROLES)}")
    allowed = set(inspect.signature(create_transform).parameters) - _RESERVED
    options = dict(ROLE_DEFAULTS[role])
    for key, value in (augment or {}).items():
        if key not in allowed:
            raise PipelineError(f"augment.{key}: not a timm create_transform option ({', '.join(sorted(allowed))})")
        options[key] = tuple(value) if isinstance(value, list) else value
    if role == "eval":  # training-only keys would be ignored by timm anyway; drop them for a clean repr
        options = {k: v for k, v in options.items() if k in ("interpolation", "crop_pct", "crop_mode", "mean", "std")}
    return options


def _posterize_any_bits(img: Any, bits_to_keep: int, **_: Any) -> Any:
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # keep no bits: a black image, as Pillow < 13 returned
        return img.point(lambda _value: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    """timm's RandAugment asks for posterize(bits=0) at high magnitudes; Pillow >= 13 raises on that.

    Route timm's posterize ops through a version that accepts 0 bits (same result as older Pillow).
    """
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize_any_bits


def build_transform(
    role: str, img_size: int, augment: Mapping[str, Any] | None = None, *, use_prefetcher: bool = False
) -> Callable[[Any], Any]:
    """PIL RGB image -> normalised float tensor [3, img_size, img_size] (with random erasing for train).

    use_prefetcher=True: timm's split for a device-side PrefetchLoader: the transform ends in a uint8
    tensor, and normalisation plus random erasing are left to the device (pipeline.data.device).
    """
    from timm.data import create_transform

    _patch_timm_posterize()
    options = transform_options(role, augment)
    return create_transform(img_size, is_training=role != "eval", use_prefetcher=use_prefetcher, **options)
