"""Encoded sample -> uint8 image tensor in a DataLoader worker, decoding no more than the crop needs.

    decoder = SampleDecoder(role, img_size, augment)
    image = decoder.open(data)                   # PIL image, header parsed, pixels not decoded yet
    cropped = decoder.decode_crop(image, data)   # the role's first (random) crop, RGB
    tensor, boxes = decoder.finish(cropped)      # uint8 [3, S, S] + random-erasing boxes [count, 4]

The transform is timm's `create_transform(..., use_prefetcher=True)` for the role (no ToTensor
scaling, no Normalize, no RandomErasing: those run on the training device, see device.py), with its
first step, timm's `RandomResizedCropAndInterpolation`, done here for train/pretrain:
- the box comes from timm's own `get_params` on the size read from the image header (same
  distribution, same random calls);
- when the crop has at least 2x img_size pixels each way, the JPEG is decoded with PIL's `draft()` at
  the largest reduction 1/2, 1/4 or 1/8 that still covers it, and PIL resizes the reduced crop;
- otherwise baseline RGB/greyscale JPEGs are decoded by libjpeg-turbo through simplejpeg (the same
  pixels as PIL's decoder, about 25% less CPU: no chunked Python feed) and the crop is resized by
  torch's uint8 antialiased bilinear/bicubic kernel, which follows PIL's filter (92% of pixels equal
  to timm's PIL resize, 8% one grey level off, rarely two or three) at about a third of its CPU
  time. Other images and interpolations take timm's PIL path unchanged.
For eval, timm's Resize(shorter side) + CenterCrop run the same way on the decoded tensor.
When the rest of the role's transform accepts tensors (flips only: pretraining), the crop stays a
tensor; otherwise (RandAugment, ...) it becomes a PIL image for timm. Random-erasing boxes are drawn
here, in timm's order of random calls (after the rest of the transform), and applied after
normalisation on the device. Callers seed python `random`, numpy and torch before `decode_crop`
(stream.py).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import simplejpeg
import torch

from pipeline.data.transforms import build_transform, transform_options

REDUCTIONS = (8, 4, 2)  # what JPEG DCT scaling (PIL draft) offers besides 1
TORCH_RESIZE = {"bilinear": "bilinear", "bicubic": "bicubic"}  # timm/torchvision mode -> torch uint8 AA kernel


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
        from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
        from torchvision import transforms

        self.role = role
        self.img_size = img_size
        options = transform_options(role, augment)
        pipeline = build_transform(role, img_size, augment, use_prefetcher=True)
        steps = list(pipeline.transforms)
        self.crop = steps[0] if isinstance(steps[0], RandomResizedCropAndInterpolation) else None
        self.resize_center_crop = _resize_center_crop(steps) if self.crop is None else None
        first = 1 if self.crop is not None else 2 if self.resize_center_crop is not None else 0
        self.rest = transforms.Compose(steps[first:])
        tensor_steps = (transforms.RandomHorizontalFlip, transforms.RandomVerticalFlip, MaybePILToTensor)
        self.rest_takes_tensors = all(isinstance(step, tensor_steps) for step in self.rest.transforms)
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
        if self.resize_center_crop is not None:  # eval: timm's Resize(shorter side) + CenterCrop on a tensor
            from torchvision.transforms import functional as F

            short_side, mode, crop_size = self.resize_center_crop
            pixels = decode_pixels(image, data)
            size = shorter_side_size(pixels.shape[1], pixels.shape[2], short_side)
            if size != tuple(pixels.shape[1:]):
                pixels = _resize(pixels[None], size, mode)
            return F.center_crop(pixels, list(crop_size))
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
        mode = TORCH_RESIZE.get(interpolation.value)
        if factor > 1 or mode is None:
            image = _rgb(image)
            if factor == 1:  # exactly timm's crop: torchvision crop then resize
                return F.resized_crop(image, top, left, height, width, list(crop.size), interpolation)
            box = (left / factor, top / factor, (left + width) / factor, (top + height) / factor)
            return image.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)
        pixels = decode_pixels(image, data)
        resized = _resize(pixels[None, :, top : top + height, left : left + width], (out_h, out_w), mode)
        if self.rest_takes_tensors:
            return resized
        from PIL import Image

        return Image.fromarray(resized.permute(1, 2, 0).numpy())

    def finish(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of the role's transform -> (uint8 [3, S, S], erasing boxes [slots, 4])."""
        tensor = self.rest(image)
        boxes = self.erase() if self.erase is not None else torch.zeros(0, 4, dtype=torch.int32)
        return tensor, boxes

    def _note(self, factor: int) -> None:
        if len(self.reductions) < 100_000:
            self.reductions.append(factor)


def shorter_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) after torchvision's Resize(int): the shorter side to `short_side`, the other truncated."""
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def _resize(region: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """[1, 3, h, w] uint8 -> [3, *size] uint8 with torch's antialiased kernel (PIL's filter).

    A channels-last copy of the region keeps torch on its vectorised uint8 path (and the output HWC).
    """
    region = region.contiguous(memory_format=torch.channels_last)
    return torch.nn.functional.interpolate(region, size=size, mode=mode, antialias=True)[0]


def _resize_center_crop(steps: list[Any]) -> tuple[int, str, tuple[int, int]] | None:
    """(shorter side, torch mode, crop size) when the eval transform is exactly timm's
    Resize(int) + CenterCrop + MaybePILToTensor with bilinear/bicubic; None: keep timm's PIL steps."""
    from timm.data.transforms import MaybePILToTensor
    from torchvision import transforms

    if len(steps) != 3 or not isinstance(steps[0], transforms.Resize) or not isinstance(
            steps[1], transforms.CenterCrop) or not isinstance(steps[2], MaybePILToTensor):
        return None
    resize = steps[0]
    size = resize.size if isinstance(resize.size, int) else resize.size[0] if len(resize.size) == 1 else None
    mode = TORCH_RESIZE.get(resize.interpolation.value)
    if size is None or mode is None or resize.max_size is not None:
        return None
    return size, mode, tuple(steps[1].size)


def decode_pixels(image: Any, data: bytes | None) -> torch.Tensor:
    """Pixels of an opened image as uint8 [3, H, W] over HWC memory (a permuted view, no copy).

    Baseline RGB/greyscale JPEGs go through simplejpeg in strict mode; anything it rejects (a
    libjpeg warning such as extraneous bytes, CMYK, a truncated file) is decoded by PIL instead, so
    which samples decode, and how, stays PIL's decision.
    """
    if data is not None and image.format == "JPEG" and image.mode in ("RGB", "L"):
        try:
            array = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError:
            array = None
        if array is not None and array.shape[:2] == (image.size[1], image.size[0]):
            return torch.from_numpy(array).permute(2, 0, 1)
    return torch.from_numpy(np.array(_rgb(image))).permute(2, 0, 1)


def _rgb(image: Any) -> Any:
    """Decoded pixels in RGB (grayscale, CMYK and palette images are converted; RGB is not copied)."""
    if image.mode == "RGB":
        image.load()
        return image
    return image.convert("RGB")
