"""Decoding less and normalising on the device keep timm's semantics: the same crop boxes as timm's
RandomResizedCrop, pixels within a grey level of timm's when no JPEG reduction applies (simplejpeg
decodes PIL's pixels exactly; torch's uint8 antialiased resize follows PIL's filter), timm's
RandomErasing boxes, and PrefetchLoader-style normalisation equal to timm's CPU transform."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.decode import EraseBoxes, SampleDecoder, decode_pixels, reduction_for
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


def jpeg_variant(data: bytes, **save: object) -> bytes:
    buffer = io.BytesIO()
    image = Image.open(io.BytesIO(data))
    mode = save.pop("mode", None)
    (image.convert(mode) if mode else image).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "variant",
    [{}, {"subsampling": 0, "quality": 95}, {"progressive": True, "quality": 85}, {"mode": "L"}, {"mode": "CMYK"}],
    ids=["420", "444", "progressive", "greyscale", "cmyk"],
)
def test_decoded_pixels_are_pils(variant: dict) -> None:
    """simplejpeg (baseline RGB/greyscale) or the PIL fallback (CMYK): PIL's RGB pixels, bit for bit."""
    data = jpeg_variant(jpeg(123, 77, 3), **variant)
    got = decode_pixels(Image.open(io.BytesIO(data)), data)
    want = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    assert got.dtype == torch.uint8 and got.shape == (3, 77, 123) and torch.equal(got, want)


def test_jpegs_simplejpeg_rejects_are_left_to_pil() -> None:
    """Strict libjpeg warnings (bytes before EOI) decode through PIL as before; truncation still raises."""
    data = jpeg(90, 60, 5)
    import simplejpeg

    padded = data[:-2] + b"\x00" * 8 + data[-2:]
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(padded, strict=True)
    got = decode_pixels(Image.open(io.BytesIO(padded)), padded)
    assert torch.equal(got, torch.from_numpy(np.array(Image.open(io.BytesIO(padded)).convert("RGB"))).permute(2, 0, 1))
    truncated = data[: len(data) // 2]
    with pytest.raises(OSError, match="truncated"):
        decode_pixels(Image.open(io.BytesIO(truncated)), truncated)


def assert_close_to_pil(got: torch.Tensor, want: torch.Tensor, *, after_randaugment: bool = False) -> None:
    """torch's uint8 antialiased resize vs PIL's: over 610 random crops of 61 JPEGs, 92% of pixels equal,
    8% one grey level apart, 0.002% two or three (bicubic rounding), a mean difference <= 0.27.
    After RandAugment a one-level difference can grow where posterize/solarize/equalize put a bin edge."""
    diff = (got - want).abs()
    rare = (diff > 1).float().mean()
    if after_randaugment:
        assert rare < 0.01 and diff.float().mean() < 0.3, (rare, diff.float().mean())
    else:
        assert diff.max() <= 3 and rare < 1e-3 and diff.float().mean() < 0.3, (diff.max(), rare, diff.float().mean())


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_torch_resize_follows_pils_within_one_level(interpolation: str) -> None:
    """Crops scaled up and down by torch's uint8 antialiased kernel vs PIL's resize of the same crop."""
    from torch.nn.functional import interpolate

    image = Image.open(io.BytesIO(jpeg(400, 330, 7))).convert("RGB")
    pixels = torch.from_numpy(np.array(image).copy()).permute(2, 0, 1)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    for top, left, height, width, size in [(0, 0, 330, 400, 224), (10, 20, 60, 45, 224), (5, 7, 300, 211, 96),
                                           (100, 50, 224, 224, 224), (33, 0, 97, 390, 64)]:
        crop = pixels[None, :, top : top + height, left : left + width].contiguous(memory_format=torch.channels_last)
        got = interpolate(crop, size=(size, size), mode=interpolation, antialias=True)[0].int()
        want = torch.from_numpy(np.array(image.crop((left, top, left + width, top + height)).resize(
            (size, size), resample))).permute(2, 0, 1).int()
        assert_close_to_pil(got, want)
    shifted = pixels[None, :, 40:330, 0:400].contiguous(memory_format=torch.channels_last)  # control: another crop
    off = interpolate(shifted, size=(224, 224), mode=interpolation, antialias=True)[0].int()
    want = torch.from_numpy(np.array(image.crop((0, 0, 400, 290)).resize((224, 224), resample))).permute(2, 0, 1)
    assert (off - want.int()).abs().max() > 1


@pytest.mark.parametrize("role", ["pretrain", "train"])
def test_without_reduction_the_pixels_are_timms_to_a_grey_level(role: str) -> None:
    """Small JPEGs (no crop covers 2x the output): timm's prefetcher transform, to a grey level."""
    decoder = SampleDecoder(role, 48, {"re_prob": 0.0})
    timm_transform = build_transform(role, 48, {"re_prob": 0.0}, use_prefetcher=True)
    assert decoder.rest_takes_tensors == (role == "pretrain")  # RandAugment needs a PIL image
    for seed in range(12):
        data = jpeg(60 + 7 * seed, 50 + 5 * seed, seed)
        image, _ = ours(decoder, data, seed)
        seeded(seed)
        want = timm_transform(Image.open(io.BytesIO(data)).convert("RGB"))
        assert image.dtype == torch.uint8 and image.shape == want.shape
        assert_close_to_pil(image.int(), want.int(), after_randaugment=role == "train")
    assert set(decoder.reductions) == {1}
    seeded(99)  # control: another seed's crop is far from this one
    other = timm_transform(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (image.int() - other.int()).abs().float().mean() > 5


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
    want = torch.stack(wanted)
    assert got.dtype == torch.float32
    level = 1 / (255 * min(IMAGENET_DEFAULT_STD))  # one grey level after normalisation (torch vs PIL resize)
    assert ((got - want).abs() > level + 1e-5).float().mean() < 1e-3 and (got - want).abs().max() < 3.01 * level
    assert torch.equal(got == 0, want == 0)  # the same erased boxes (const fill)
    assert any(bool(b[:, 2].any()) for b in boxes)  # some images were erased


def test_device_normalisation_is_timms_normalize_of_the_same_uint8() -> None:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision.transforms import Normalize

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    normalize = DeviceNormalizer(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, torch.device("cpu"))
    got = normalize(images, torch.zeros(4), torch.zeros(4, 0, 4, dtype=torch.int32), batch_seed=0)
    want = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(images.float() / 255)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


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


def test_eval_resize_and_centre_crop_are_timms_to_a_grey_level() -> None:
    """Eval (timm's Resize(shorter side) + CenterCrop) on the decoded tensor: timm's PIL result's geometry."""
    decoder = SampleDecoder("eval", 56, None)
    assert decoder.resize_center_crop == (64, "bicubic", (56, 56))  # floor(56 / 0.875), timm's default
    timm_transform = build_transform("eval", 56, None, use_prefetcher=True)
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg(90, 71, 2))).save(png, format="PNG")
    for data in (jpeg(120, 80, 0), jpeg(64, 150, 1), jpeg(64, 64, 4), jpeg(40, 50, 3), png.getvalue()):
        seeded(0)
        got, _ = decoder.finish(decoder.decode_crop(decoder.open(data), data))
        want = timm_transform(Image.open(io.BytesIO(data)).convert("RGB"))
        assert got.shape == want.shape == (3, 56, 56)
        assert_close_to_pil(got.int(), want.int())
    shifted = timm_transform(Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT))
    assert (got.int() - shifted.int()).abs().float().mean() > 5  # control: a mirrored image is far
    squash = SampleDecoder("eval", 56, {"crop_mode": "squash"})
    assert squash.resize_center_crop is None  # a geometry we do not mirror keeps timm's PIL steps
