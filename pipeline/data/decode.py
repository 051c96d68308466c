"""Encoded sample -> uint8 image tensor in a DataLoader worker, decoding no more than the crop needs.

    decoder = SampleDecoder(role, img_size, augment)
    image = decoder.open(data)                   # PIL image, header parsed, pixels not decoded yet
    cropped = decoder.decode_crop(image)         # the role's first (random) crop, RGB
    tensor, boxes = decoder.finish(cropped)      # uint8 [3, S, S] + random-erasing boxes [count, 4]

The transform is timm's `create_transform(..., use_prefetcher=True)` for the role (no ToTensor
scaling, no Normalize, no RandomErasing: those run on the training device, see device.py), with one
step replaced: for train/pretrain, timm's `RandomResizedCropAndInterpolation` draws its box with its
own `get_params` on the size read from the image header (same distribution, same random calls), and
the JPEG is decoded with PIL's `draft()` at the largest reduction 1/2, 1/4 or 1/8 at which the crop
still has at least img_size pixels each way; the crop is then resized from the reduced image. With no
reduction (small crops, PNGs) the result is exactly timm's. Random-erasing boxes are drawn here, in
timm's order of random calls (after the rest of the transform), and applied after normalisation on
the device. Callers seed python `random`, numpy and torch before `decode_crop` (stream.py).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping
from typing import Any

import torch

from pipeline.data.transforms import build_transform, transform_options

REDUCTIONS = (8, 4, 2)  # what JPEG DCT scaling (PIL draft) offers besides 1


class EraseBoxes:
    """timm RandomErasing's boxes (its parameters, its sequence of random calls), without the fill.

    Returns [max_count, 4] int32 rows (top, left, height, width); unused rows are zero.
    """

    def __init__(self, probability: float, mode: str, max_count: int, size: int):
        from timm.data.random_erasing import RandomErasing

        self.params = RandomErasing(probability=probability, mode=mode, max_count=max_count, device="cpu")
        self.size = size

    @property
    def mode(self) -> str:
        return self.params.mode

    @property
    def max_count(self) -> int:
        return self.params.max_count

    def __call__(self) -> torch.Tensor:
        p, size = self.params, self.size
        boxes = torch.zeros(p.max_count, 4, dtype=torch.int32)
        if random.random() > p.probability:
            return boxes
        count = p.min_count if p.min_count == p.max_count else random.randint(p.min_count, p.max_count)
        area = size * size
        for slot in range(count):
            for _attempt in range(10):
                target = random.uniform(p.min_area, p.max_area) * area / count
                aspect = math.exp(random.uniform(*p.log_aspect_ratio))
                height = int(round(math.sqrt(target * aspect)))
                width = int(round(math.sqrt(target / aspect)))
                if width < size and height < size:
                    top = random.randint(0, size - height)
                    left = random.randint(0, size - width)
                    boxes[slot] = torch.tensor([top, left, height, width], dtype=torch.int32)
                    break
        return boxes


def reduction_for(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
    """The largest JPEG draft reduction (8, 4, 2, else 1) that keeps the crop at >= the output size."""
    for factor in REDUCTIONS:
        if crop_w >= factor * out_w and crop_h >= factor * out_h:
            return factor
    return 1


class SampleDecoder:
    """One role's decode + CPU augmentation; picklable (built again inside each worker)."""

    def __init__(self, role: str, img_size: int, augment: Mapping[str, Any] | None):
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision import transforms

        self.role = role
        self.img_size = img_size
        options = transform_options(role, augment)
        pipeline = build_transform(role, img_size, augment, use_prefetcher=True)
        steps = list(pipeline.transforms)
        self.crop = steps[0] if isinstance(steps[0], RandomResizedCropAndInterpolation) else None
        self.rest = transforms.Compose(steps[1:]) if self.crop is not None else pipeline
        re_prob = float(options.get("re_prob") or 0.0)
        self.erase = (
            EraseBoxes(re_prob, options.get("re_mode", "const"), int(options.get("re_count", 1)), img_size)
            if role != "eval" and re_prob > 0
            else None
        )
        self.reductions: list[int] = []  # draft reduction per decoded sample (for tests/benchmarks), bounded

    @property
    def erase_slots(self) -> int:
        return self.erase.max_count if self.erase is not None else 0

    @staticmethod
    def open(data: bytes) -> Any:
        from PIL import Image

        return Image.open(io.BytesIO(data))

    def decode_crop(self, image: Any, data: bytes | None = None) -> Any:
        """Decode (at a draft reduction when the crop allows it) and apply the role's random crop."""
        if self.crop is None:
            return _rgb(image)
        from torchvision.transforms import functional as F

        crop = self.crop
        top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)  # header size only
        interpolation = (
            random.choice(crop.interpolation) if isinstance(crop.interpolation, (tuple, list)) else crop.interpolation
        )
        out_w, out_h = crop.size[1], crop.size[0]
        factor = reduction_for(width, height, out_w, out_h) if image.format == "JPEG" else 1
        if factor > 1:
            image.draft("RGB", (image.size[0] // factor, image.size[1] // factor))
            factor = image.decoderconfig[0] if image.decoderconfig else 1  # what PIL chose (never larger)
        self._note(factor)
        image = _rgb(image)
        if factor == 1:  # exactly timm's crop: torchvision crop then resize
            return F.resized_crop(image, top, left, height, width, list(crop.size), interpolation)
        box = (left / factor, top / factor, (left + width) / factor, (top + height) / factor)
        return image.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)

    def finish(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of the role's transform -> (uint8 [3, S, S], erasing boxes [slots, 4])."""
        tensor = self.rest(image)
        boxes = self.erase() if self.erase is not None else torch.zeros(0, 4, dtype=torch.int32)
        return tensor, boxes

    def _note(self, factor: int) -> None:
        if len(self.reductions) < 100_000:
            self.reductions.append(factor)


def _rgb(image: Any) -> Any:
    """Decoded pixels in RGB (grayscale, CMYK and palette images are converted; RGB is not copied)."""
    if image.mode == "RGB":
        image.load()
        return image
    return image.convert("RGB")
