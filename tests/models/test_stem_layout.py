"""The stem in channels_last (NHWC, cuDNN's convolution layout) computes what the NCHW stem computes.

float64 on the CPU, so that summation order cannot flip a spike: the dense, masked and MIM visible-token
paths, forward and backward, against the same weights in the default layout.
"""

from __future__ import annotations

import copy

import pytest
import torch

import models
from models.mim import MaskedImageModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(**kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = models.create("spikformer_v2_tiny", T=2, stem_layout="contiguous", **kwargs).double().train()
    nhwc = copy.deepcopy(plain)
    nhwc.patch_embed.layout = "channels_last"
    return plain, nhwc


def _conv_inputs_channels_last(model: torch.nn.Module) -> list[bool]:
    """Filled as the stem runs: for each image-grid conv input (not the visible path's [T*B, C, n]
    tokens), whether it is NHWC."""
    seen: list[bool] = []

    def hook(module, args):
        x = args[0]
        if x.dim() == 4:
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())

    for module in model.patch_embed.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(hook)
    return seen


def _assert_same_grads(got: torch.nn.Module, expected: torch.nn.Module) -> None:
    for (name, a), b in zip(expected.named_parameters(), got.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_channels_last_stem_equals_the_nchw_stem():
    plain, nhwc = _pair()
    layouts = _conv_inputs_channels_last(nhwc)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    active = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.5
    for args in ((images,), (images, active)):  # dense, and the masked (SparK) path
        expected, got = plain.forward_tokens(*args), nhwc.forward_tokens(*args)
        assert got.is_contiguous() and torch.equal(got, expected) and expected.abs().sum() > 0
        expected.square().sum().backward()
        got.square().sum().backward()
        _assert_same_grads(nhwc, plain)
    assert layouts and all(layouts)  # every conv of the stem saw an NHWC input


def test_channels_last_stem_on_the_mim_visible_path():
    plain, nhwc = _pair(num_classes=0)
    mim_plain = MaskedImageModel(plain, decoder_dim=16, decoder_depth=1, decoder_heads=2).double()
    mim_nhwc = copy.deepcopy(mim_plain)
    mim_nhwc.encoder.patch_embed.layout = "channels_last"
    layouts = _conv_inputs_channels_last(mim_nhwc.encoder)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = mim_plain.random_mask(2, "cpu", generator=torch.Generator().manual_seed(4))
    expected, got = mim_plain(images, mask)[0], mim_nhwc(images, mask)[0]
    assert torch.equal(got, expected)
    expected.backward()
    got.backward()
    _assert_same_grads(mim_nhwc, mim_plain)
    assert layouts and all(layouts)


def test_auto_layout_is_nchw_off_cuda_and_bad_values_are_refused():
    model = models.create("spikformer_v2_tiny", T=1)
    assert model.patch_embed.layout == "auto"
    layouts = _conv_inputs_channels_last(model)
    model(torch.randn(1, 3, 32, 32))
    assert layouts and not any(layouts)  # CPU, eager: the contiguous layout as before
    with pytest.raises(ValueError, match="stem_layout"):
        models.create("spikformer_v2_tiny", stem_layout="nhwc")
