"""decode: cpu | gpu | auto — which roles may decode on the GPU, the errors, and the GPU path's geometry
(run here on the CPU device; the CUDA test runs only where a GPU is present)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.decode import SampleDecoder
from pipeline.data.gpu_decode import GeometrySampler, GpuDecoder, choose_decode, collate_payloads
from pipeline.errors import PipelineError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_selection() -> None:
    assert choose_decode("cpu", "train", None, CUDA) == "cpu"
    assert choose_decode("gpu", "pretrain", None, CUDA) == "gpu"
    assert choose_decode("gpu", "eval", None, CUDA) == "gpu"
    assert choose_decode("gpu", "train", {"auto_augment": None, "re_prob": 0.25}, CUDA) == "gpu"
    with pytest.raises(PipelineError, match=r"gpu cannot run the train transform .*augment\.auto_augment="
                                            r"'rand-m9-mstd0\.5-inc1'"):
        choose_decode("gpu", "train", None, CUDA)
    with pytest.raises(PipelineError, match=r"augment\.color_jitter=0\.4"):
        choose_decode("gpu", "pretrain", {"color_jitter": 0.4}, CUDA)
    with pytest.raises(PipelineError, match="gpu needs a CUDA training device, this process trains on cpu"):
        choose_decode("gpu", "pretrain", None, CPU)
    with pytest.raises(PipelineError, match="data.decode must be one of cpu, gpu, auto"):
        choose_decode("nvjpeg", "pretrain", None, CUDA)
    # auto: the GPU where it can, the CPU otherwise
    assert choose_decode("auto", "pretrain", None, CUDA) == "gpu"
    assert choose_decode("auto", "train", None, CUDA) == "cpu"
    assert choose_decode("auto", "pretrain", None, CPU) == "cpu"


def test_build_loader_applies_the_selection(digits_shards: str) -> None:
    from pipeline.data.stream import build_loader

    loader = build_loader(digits_shards, "pretrain", batch_size=8, img_size=32, decode="auto", device="cpu")
    assert loader.decode == "cpu"
    with pytest.raises(PipelineError, match="needs a CUDA training device"):
        build_loader(digits_shards, "pretrain", batch_size=8, img_size=32, decode="gpu", device="cpu")


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def gpu_path_batch(role: str, datas: list[bytes], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    sampler = GeometrySampler(role, 32, {"re_prob": 0.0})
    cpu = SampleDecoder(role, 32, {"re_prob": 0.0})
    items, wanted = [], []
    for seed, data in enumerate(datas):
        random.seed(seed)
        torch.manual_seed(seed)
        item, _ = sampler.finish(sampler.decode_crop(sampler.open(data), data))
        items.append(item)
        random.seed(seed)
        torch.manual_seed(seed)
        wanted.append(cpu.finish(cpu.decode_crop(cpu.open(data), data))[0])
    payload, offsets, geometry = collate_payloads(items)
    return GpuDecoder(32, device)(payload, offsets, geometry), torch.stack(wanted)


@pytest.mark.parametrize("role", ["pretrain", "eval"])
def test_gpu_path_geometry_matches_the_cpu_path(role: str) -> None:
    """Same crop box and flip as the CPU path (decoded with torchvision here, on the CPU device)."""
    datas = [jpeg(40 + 9 * s, 36 + 5 * s, s) for s in range(10)]
    got, want = gpu_path_batch(role, datas, CPU)
    assert got.dtype == torch.uint8 and got.shape == want.shape == (10, 3, 32, 32)
    error = (got.float() - want.float()).abs().mean(dim=(1, 2, 3))
    # pretrain: the same box, only the resampling kernels differ; eval: timm resizes then crops, the GPU
    # path crops then resizes once (the box differs by under a source pixel)
    assert error.max() < (6 if role == "pretrain" else 10), error
    assert error.median() < 4, error
    flipped = (got.float() - want.flip(-1).float()).abs().mean(dim=(1, 2, 3))
    if role == "pretrain":
        assert bool((flipped > error).any())  # the flips agree (a mismatched flip would be far off)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader_decodes_on_the_gpu(tmp_path) -> None:
    from pipeline.data.stream import build_loader
    from pipeline.data.writer import write_shards

    from .images import build_imagefolder

    root = build_imagefolder(tmp_path / "tree")
    (root / "cat" / "broken.jpg").unlink()
    report = write_shards("imagefolder", str(tmp_path / "shards"), root=str(root), shard_max_count=5, workers=0,
                          progress=False)
    options = dict(batch_size=4, img_size=32, num_workers=2, decode="gpu", device="cuda", with_keys=True)
    first = list(build_loader(report.manifest_url, "pretrain", **options))
    again = list(build_loader(report.manifest_url, "pretrain", **options))
    assert all(images.is_cuda and images.shape == (4, 3, 32, 32) for images, _, _ in first)
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(first, again, strict=True))
