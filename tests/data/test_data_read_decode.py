"""Decoding less and normalising on the device keep timm's semantics: the same crop boxes as timm's
RandomResizedCrop, the same pixels when no JPEG reduction applies, timm's RandomErasing boxes, and
PrefetchLoader-style normalisation equal to timm's CPU transform."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.decode import EraseBoxes, SampleDecoder, reduction_for
from pipeline.data.device import DeviceNormalizer
from pipeline.data.transforms import build_transform

torch.set_num_threads(1)


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((width, height))
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (height, width, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def seeded(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ours(decoder: SampleDecoder, data: bytes, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    seeded(seed)
    return decoder.finish(decoder.decode_crop(decoder.open(data), data))


def test_reduction_is_the_largest_that_still_covers_the_output() -> None:
    assert reduction_for(400, 300, 224, 224) == 1
    assert reduction_for(448, 448, 224, 224) == 2
    assert reduction_for(447, 900, 224, 224) == 1
    assert reduction_for(1000, 1000, 224, 224) == 4
    assert reduction_for(5000, 4000, 224, 224) == 8


@pytest.mark.parametrize("role", ["pretrain", "train"])
def test_without_reduction_the_pixels_are_timms(role: str) -> None:
    """Small JPEGs (no crop covers 2x the output): bit-identical to timm's prefetcher transform."""
    decoder = SampleDecoder(role, 48, {"re_prob": 0.0})
    timm_transform = build_transform(role, 48, {"re_prob": 0.0}, use_prefetcher=True)
    for seed in range(12):
        data = jpeg(60 + 7 * seed, 50 + 5 * seed, seed)
        image, _ = ours(decoder, data, seed)
        seeded(seed)
        want = timm_transform(Image.open(io.BytesIO(data)).convert("RGB"))
        assert image.dtype == torch.uint8 and torch.equal(image, want)
    assert set(decoder.reductions) == {1}


def test_large_jpegs_decode_reduced_with_timms_crop_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    from timm.data.transforms import RandomResizedCropAndInterpolation as RRC

    boxes: list[tuple[int, ...]] = []
    original = RRC.get_params

    def recording(img, scale, ratio):
        box = original(img, scale, ratio)
        boxes.append((img.size, box))
        return box

    monkeypatch.setattr(RRC, "get_params", staticmethod(recording))
    decoder = SampleDecoder("pretrain", 64, None)
    timm_transform = build_transform("pretrain", 64, None, use_prefetcher=True)
    diffs = []
    for seed in range(16):
        data = jpeg(900, 700, seed)
        image, _ = ours(decoder, data, seed)
        seeded(seed)
        want = timm_transform(Image.open(io.BytesIO(data)).convert("RGB"))
        assert boxes[-2] == boxes[-1]  # header size == decoded size, same box from the same random draws
        diffs.append((image.float() - want.float()).abs().mean().item())
    assert max(decoder.reductions) >= 4  # crops of 256+ px for a 64 px output: decoded at 1/4 or 1/8
    assert max(diffs) < 4.0, diffs  # same crop, close pixels (DCT-domain downscale vs bicubic from full size)


def test_erase_boxes_are_timms_random_erasing() -> None:
    from timm.data.random_erasing import RandomErasing

    for count in (1, 3):
        sampler = EraseBoxes(0.6, "const", count, 40)
        timm_erasing = RandomErasing(0.6, mode="const", max_count=count, device="cpu")
        hits = 0
        for seed in range(60):
            random.seed(seed)
            boxes = sampler()
            random.seed(seed)
            want = timm_erasing(torch.ones(3, 40, 40))[0] == 0
            got = torch.zeros(40, 40, dtype=torch.bool)
            for top, left, h, w in boxes.tolist():
                got[top : top + h, left : left + w] = True
            assert torch.equal(got, want)
            hits += bool(got.any())
        assert 0 < hits < 60


def test_uint8_plus_device_normalisation_equals_timms_cpu_transform() -> None:
    """Worker uint8 + DeviceNormalizer (const erasing) == timm create_transform with ToTensor/Normalize/erasing."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    augment = {"re_prob": 0.5, "re_mode": "const", "re_count": 2}
    decoder = SampleDecoder("train", 40, augment)
    cpu_transform = build_transform("train", 40, augment)  # timm's full CPU pipeline
    normalize = DeviceNormalizer(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, torch.device("cpu"), erase_mode="const")
    images, boxes, wanted = [], [], []
    for seed in range(16):
        data = jpeg(50 + seed, 45 + 2 * seed, seed)
        image, box = ours(decoder, data, seed)
        images.append(image)
        boxes.append(box)
        seeded(seed)
        wanted.append(cpu_transform(Image.open(io.BytesIO(data)).convert("RGB")))
    got = normalize(torch.stack(images), torch.zeros(16, dtype=torch.long), torch.stack(boxes), batch_seed=1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack(wanted), atol=1e-5, rtol=1e-5)
    assert any(bool(b[:, 2].any()) for b in boxes)  # some images were erased


def test_pixel_erasing_noise_is_seeded_per_batch() -> None:
    normalize = DeviceNormalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"), erase_mode="pixel")
    images = torch.full((2, 3, 8, 8), 128, dtype=torch.uint8)
    boxes = torch.tensor([[[1, 2, 3, 4]], [[0, 0, 0, 0]]], dtype=torch.int32)
    first = normalize(images, torch.zeros(2), boxes, batch_seed=7)
    again = normalize(images, torch.zeros(2), boxes, batch_seed=7)
    other = normalize(images, torch.zeros(2), boxes, batch_seed=8)
    assert torch.equal(first, again) and not torch.equal(first, other)
    background = torch.full((8, 8), (128 - 127.5) / 63.75)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[1:4, 2:6] = True
    assert torch.allclose(first[0, 0][~inside], background[~inside]) and not torch.allclose(first[0, 0][inside],
                                                                                             background[inside])
    assert torch.allclose(first[1, 0], background)  # no box: untouched


def test_workers_hand_over_uint8(digits_shards: str) -> None:
    from pipeline.data.stream import build_loader

    loader = build_loader(digits_shards, "train", batch_size=16, img_size=32, num_workers=1, device="cpu")
    images, labels, boxes, keys = next(iter(loader.raw_batches()))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32) and len(keys) == 16
    assert boxes.shape == (16, 1, 4)  # train role: random erasing (re_count 1) boxes from the workers
    normalised, _ = next(iter(loader))
    assert normalised.dtype == torch.float32 and normalised.shape == (16, 3, 32, 32)
