"""Optional GPU decoding: workers parse headers and draw crops, the training GPU decodes and crops.

    decode = choose_decode("auto", role, augment, device)   # "cpu" or "gpu" (data.decode in the job)

With decode "gpu" a DataLoader worker only opens each image's header (PIL) and draws, seeded per
sample as on the CPU path, timm's RandomResizedCrop box (its get_params on the header size), the
flip (torchvision RandomHorizontalFlip's `torch.rand(1) < p`) and the random-erasing boxes; it hands
over the encoded bytes. `GpuDecoder` then decodes the batch's JPEGs in one
`torchvision.io.decode_jpeg(..., device="cuda")` call (nvJPEG), crops and resizes each with
antialiasing, flips, and the normaliser (device.py) does the rest. Non-JPEG images (PNG) are decoded
in the worker and shipped as pixels. Eval uses the same geometry as timm's eval transform (resize the
shorter side to img_size / crop_pct, centre crop) folded into one crop-and-resize.

Only transforms with no PIL-only step can move: RandAugment/AutoAugment, colour jitter, grayscale,
blur and vertical flips cannot, so "gpu" refuses them (naming the augment key) and "auto" falls back
to the CPU path for that role.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from typing import Any

import torch

from pipeline.data.decode import EraseBoxes
from pipeline.data.transforms import transform_options
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

DECODE_MODES = ("cpu", "gpu", "auto")
_DEVICE_SAFE = {
    "scale", "ratio", "hflip", "interpolation", "re_prob", "re_mode", "re_count", "mean", "std", "crop_pct",
}
_INTERPOLATIONS = ("bilinear", "bicubic")  # timm's "random" choice, in its order
_JPEG, _PIXELS = 0, 1
GEOMETRY = ("top", "left", "crop_h", "crop_w", "flip", "kind", "interp", "image_h", "image_w")  # columns


def unsupported_on_gpu(role: str, augment: Mapping[str, Any] | None) -> list[str]:
    """The role's transform options that only exist as PIL operations (empty: it can run on the GPU)."""
    options = transform_options(role, augment)
    bad = []
    for key, value in options.items():
        if key in _DEVICE_SAFE or not value:
            continue
        if key == "crop_mode" and value == "center":
            continue
        bad.append(f"augment.{key}={value!r}")
    if options.get("interpolation") not in (*_INTERPOLATIONS, "random", None):
        bad.append(f"augment.interpolation={options['interpolation']!r}")
    return bad


def choose_decode(decode: str, role: str, augment: Mapping[str, Any] | None, device: torch.device) -> str:
    """'cpu' or 'gpu' for this loader. 'gpu' is strict (PipelineError naming what prevents it);
    'auto' takes the GPU when the device is CUDA and the role's transform allows, else the CPU."""
    if decode not in DECODE_MODES:
        raise PipelineError(f"data.decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "cpu":
        return "cpu"
    bad = unsupported_on_gpu(role, augment)
    if decode == "gpu":
        if device.type != "cuda":
            raise PipelineError(f"data.decode: gpu needs a CUDA training device, this process trains on {device}")
        if bad:
            raise PipelineError(
                f"data.decode: gpu cannot run the {role} transform on the device ({', '.join(bad)} are PIL "
                f"operations); use data.decode: auto (CPU for this role) or cpu"
            )
        return "gpu"
    if device.type == "cuda" and not bad:
        return "gpu"
    logger.info("data.decode auto: %s decodes on the CPU (%s)", role,
                ", ".join(bad) if bad else f"device {device}")
    return "cpu"


class GeometrySampler:
    """Worker side of decode="gpu": the same interface as decode.SampleDecoder, without decoding."""

    def __init__(self, role: str, img_size: int, augment: Mapping[str, Any] | None):
        options = transform_options(role, augment)
        self.role = role
        self.img_size = img_size
        self.scale = tuple(options.get("scale") or (0.08, 1.0))
        self.ratio = tuple(options.get("ratio") or (3 / 4, 4 / 3))
        self.hflip = float(options.get("hflip") or 0.0)
        self.interpolation = options.get("interpolation") or "bilinear"
        self.crop_pct = float(options.get("crop_pct") or 0.875)
        re_prob = float(options.get("re_prob") or 0.0)
        self.erase = (
            EraseBoxes(re_prob, options.get("re_mode", "const"), int(options.get("re_count", 1)), img_size)
            if role != "eval" and re_prob > 0
            else None
        )

    @property
    def erase_slots(self) -> int:
        return self.erase.max_count if self.erase is not None else 0

    @staticmethod
    def open(data: bytes) -> Any:
        import io

        from PIL import Image

        return Image.open(io.BytesIO(data))  # header only

    def decode_crop(self, image: Any, data: bytes | None = None) -> tuple[torch.Tensor, list[int]]:
        """(payload, geometry row): JPEG bytes (or decoded pixels for other formats) and the crop."""
        from timm.data.transforms import RandomResizedCropAndInterpolation

        width, height = image.size
        if self.role == "eval":
            top, left, crop_h, crop_w = self._eval_box(width, height)
            interp = self.interpolation
        else:
            top, left, crop_h, crop_w = RandomResizedCropAndInterpolation.get_params(image, self.scale, self.ratio)
            interp = random.choice(_INTERPOLATIONS) if self.interpolation == "random" else self.interpolation
        if image.format == "JPEG":
            assert data is not None
            payload, kind = torch.frombuffer(bytearray(data), dtype=torch.uint8), _JPEG
        else:
            from torchvision.transforms.functional import pil_to_tensor

            payload, kind = pil_to_tensor(image.convert("RGB")).flatten(), _PIXELS
        return payload, [top, left, crop_h, crop_w, 0, kind, _INTERPOLATIONS.index(interp), height, width]

    def finish(self, cropped: tuple[torch.Tensor, list[int]]) -> tuple[tuple[torch.Tensor, list[int]], torch.Tensor]:
        payload, geometry = cropped
        if self.role != "eval" and self.hflip > 0:
            geometry[4] = int(torch.rand(1).item() < self.hflip)  # as torchvision RandomHorizontalFlip draws
        boxes = self.erase() if self.erase is not None else torch.zeros(0, 4, dtype=torch.int32)
        return (payload, geometry), boxes

    def pad(self) -> tuple[torch.Tensor, list[int]]:
        size = self.img_size
        return torch.zeros(3 * size * size, dtype=torch.uint8), [0, 0, size, size, 0, _PIXELS, 0, size, size]

    def _eval_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """timm eval geometry (shorter side -> floor(S / crop_pct), centre crop S) as one box."""
        size = self.img_size
        short = math.floor(size / self.crop_pct)
        factor = short / min(width, height)
        crop_h = min(height, round(size / factor))
        crop_w = min(width, round(size / factor))
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def collate_payloads(items: list[tuple[torch.Tensor, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One flat uint8 payload, offsets [B + 1] and geometry [B, 9] (one shared-memory hand-off each)."""
    payloads = [payload for payload, _ in items]
    offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([p.numel() for p in payloads]).cumsum(0)
    return torch.cat(payloads), offsets, torch.tensor([g for _, g in items], dtype=torch.int64)


class GpuDecoder:
    """Main-process side: flat payload + geometry -> uint8 [B, 3, S, S] on `device`."""

    def __init__(self, img_size: int, device: torch.device):
        self.img_size = img_size
        self.device = device

    def __call__(self, payload: torch.Tensor, offsets: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        rows = geometry.tolist()
        pieces = [payload[offsets[i] : offsets[i + 1]] for i in range(len(rows))]
        jpegs = [i for i, row in enumerate(rows) if row[5] == _JPEG]
        decoded: dict[int, torch.Tensor] = {}
        if jpegs:
            device = self.device.type if self.device.type == "cpu" else self.device
            images = decode_jpeg([pieces[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            decoded.update(zip(jpegs, images, strict=True))
        size = [self.img_size, self.img_size]
        modes = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
        out = []
        for i, (top, left, crop_h, crop_w, flip, kind, interp, height, width) in enumerate(rows):
            if kind == _JPEG:
                image = decoded[i]
            else:
                image = pieces[i].to(self.device, non_blocking=True).view(3, height, width)
            image = F.resized_crop(image, top, left, crop_h, crop_w, size, interpolation=modes[interp], antialias=True)
            if flip:
                image = image.flip(-1)
            out.append(image)
        return torch.stack(out)
