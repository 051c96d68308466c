"""The SparK-style masking hook: nothing at a masked position reaches a visible one (float64, exact)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models
from models.neuron import MultiStepLIF
from models.spikformer import MaskedBatchNorm1d, MaskedBatchNorm2d, Spikformer, VisibleMask

LAYOUT_TB = (MultiStepLIF,)  # outputs [T, B, ...]; every other leaf op outputs [T*B, ...]
LEAF_OPS = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.MaxPool2d, MultiStepLIF)


def make_model(stem: str = "scs", train: bool = True) -> Spikformer:
    """Stride 4 on 32 px -> 8x8 tokens; two unpooled stages, SCS layers at two widths.

    For eval mode the BN running statistics are first set from one training batch (momentum 1), so
    the network fires (with the initial running stats an untrained net is silent in eval mode).
    """
    torch.manual_seed(0)
    model = Spikformer(
        img_size=32,
        embed_dim=32,
        depth=2,
        num_heads=2,
        T=2,
        stem=stem,
        stem_pools=2,
        scs_extra_convs=(0, 1, 0, 2),
        num_classes=5,
    ).double()
    if not train:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
        with torch.no_grad():
            model.forward_tokens(torch.randn(3, 3, 32, 32, dtype=torch.float64))
        model.eval()
    return model


def make_mask(batch: int = 3, grid: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    active = torch.rand(batch, 1, grid, grid, generator=gen) < 0.5
    active[:, :, 0, 0] = True  # every sample keeps something
    return active


def visible(tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return tokens.masked_select(active.unsqueeze(0).expand_as(tokens))


def pixels_of(active: torch.Tensor, stride: int) -> torch.Tensor:
    return active.repeat_interleave(stride, 2).repeat_interleave(stride, 3)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("stem", ["scs", "sps"])
def test_masked_pixels_do_not_change_visible_tokens(train, stem):
    model = make_model(stem, train)
    active = make_mask()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    changed = torch.where(pixels_of(active, 4), images, torch.randn_like(images) * 50)
    assert not torch.equal(images, changed)
    with torch.no_grad():
        base = copy.deepcopy(model).forward_tokens(images, active)
        other = copy.deepcopy(model).forward_tokens(changed, active)
        unmasked = copy.deepcopy(model).forward_tokens(changed)
    assert base.shape == (2, 3, 32, 8, 8)
    assert torch.equal(visible(base, active), visible(other, active))
    assert not base.masked_select(~active.unsqueeze(0).expand_as(base)).any()  # masked tokens are zero
    assert visible(base, active).any()
    assert not torch.equal(visible(base, active), visible(unmasked, active))  # masking does act


def corrupt_masked_positions(model: nn.Module, active: torch.Tensor, T: int) -> list:
    """Forward hooks writing noise into the masked positions of every conv, BN, pool and LIF output."""
    mask = VisibleMask(active, T)
    gen = torch.Generator().manual_seed(7)

    def hook(module, inputs, out):
        if isinstance(module, LAYOUT_TB):  # [T, B, C, H, W] or [T, B, C, N]
            keep = mask.grid(*out.shape[-2:]).unsqueeze(0) if out.dim() == 5 else mask.active.flatten(2)[None]
        else:  # [T*B, C, H, W] or [T*B, C, N]
            keep = mask.token_rows() if out.dim() == 3 else mask.rows(*out.shape[-2:])
        noise = torch.randn(out.shape, generator=gen, dtype=out.dtype) * 10
        return torch.where(keep.expand_as(out), out, noise)

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LEAF_OPS)]


@pytest.mark.parametrize("train", [True, False])
def test_noise_at_masked_positions_of_every_layer_never_reaches_visible_tokens(train):
    """Stronger than the pixel test: the mask must be re-applied after every conv, BN, pool and LIF."""
    model = make_model(train=train)
    active = make_mask()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        clean = copy.deepcopy(model).forward_tokens(images, active)
        noisy_model = copy.deepcopy(model)
        handles = corrupt_masked_positions(noisy_model, active, T=2)
        noisy = noisy_model.forward_tokens(images, active)
    assert len(handles) > 40
    assert visible(clean, active).any()
    assert torch.equal(visible(clean, active), visible(noisy, active))


def test_noise_test_detects_a_missing_remask(monkeypatch):
    """Control: without the re-masking the same noise does reach visible tokens."""
    model = make_model()
    active = make_mask()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        clean = copy.deepcopy(model).forward_tokens(images, active)
        monkeypatch.setattr(VisibleMask, "apply", lambda self, y: y)
        monkeypatch.setattr(VisibleMask, "apply_", lambda self, y: y)
        noisy_model = copy.deepcopy(model)
        corrupt_masked_positions(noisy_model, active, T=2)
        noisy = noisy_model.forward_tokens(images, active)
    assert not torch.equal(visible(clean, active), visible(noisy, active))


def test_all_visible_mask_equals_unmasked_forward():
    model = make_model()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        full = copy.deepcopy(model).forward_tokens(images, torch.ones(3, 1, 8, 8, dtype=torch.bool))
        plain = copy.deepcopy(model).forward_tokens(images)
    torch.testing.assert_close(full, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls, shape", [(MaskedBatchNorm2d, (6, 4, 5, 5)), (MaskedBatchNorm1d, (6, 4, 9))])
def test_masked_batchnorm_uses_visible_statistics(cls, shape):
    torch.manual_seed(3)
    bn = cls(4, momentum=0.5).double()
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    keep = torch.rand(shape[0], 1, *shape[2:]) < 0.4
    x = x.requires_grad_(True)
    out = bn(x, keep)
    vis = x.detach().movedim(1, -1)[keep.movedim(1, -1).squeeze(-1)]  # [n, C]
    mean, var = vis.mean(0), vis.var(0, unbiased=False)
    expected = (x.detach().movedim(1, -1) - mean) / torch.sqrt(var + bn.eps)
    expected = expected.movedim(-1, 1).masked_fill(~keep, 0.0)
    torch.testing.assert_close(out.detach(), expected)
    torch.testing.assert_close(bn.running_mean, 0.5 * mean)  # momentum 0.5 from 0
    torch.testing.assert_close(bn.running_var, 0.5 + 0.5 * vis.var(0, unbiased=True))
    assert bn.num_batches_tracked.item() == 1
    out.sum().backward()
    assert x.grad.masked_select(~keep.expand_as(x)).abs().sum() == 0  # masked inputs get no gradient
    # eval: running stats, masked positions zero
    bn.eval()
    ref = nn.functional.batch_norm(x.detach(), bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
    torch.testing.assert_close(bn(x.detach(), keep), ref.masked_fill(~keep, 0.0))
    # state_dict names stay those of the parent BatchNorm
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def test_masked_training_step_has_finite_gradients():
    model = models.create("spikformer_v2_tiny", T=1)
    active = torch.rand(4, 1, 8, 8) < 0.4
    active[:, :, 0, 0] = True
    tokens = model.forward_tokens(torch.randn(4, 3, 32, 32), active)
    tokens.square().mean().backward()
    for name, p in model.named_parameters():
        if not name.startswith("head."):  # forward_tokens stops before the head
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_active_is_validated():
    model = models.create("spikformer_v2_tiny")
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"active must be a bool tensor of shape \(2, 1, 8, 8\)"):
        model.forward_tokens(images, torch.ones(2, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="active must be a bool tensor"):
        model.forward_tokens(images, torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible by the stride 4"):
        model.forward_tokens(torch.randn(2, 3, 30, 30), torch.ones(2, 1, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls, shape", [(MaskedBatchNorm2d, (6, 4, 5, 5)), (MaskedBatchNorm1d, (6, 4, 9))])
def test_masked_sums_batchnorm_equals_the_indexed_reference_over_several_steps(cls, shape, momentum):
    """forward (masked sums, static shapes) == forward_indexed (boolean indexing, the original code):
    outputs, input/weight/bias gradients, running statistics and the step counter, then eval mode."""
    torch.manual_seed(4)
    sums = cls(4, momentum=momentum).double()
    with torch.no_grad():
        sums.weight.uniform_(0.5, 2.0)
        sums.bias.uniform_(-1.0, 1.0)
    indexed = copy.deepcopy(sums)
    for step in range(4):
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_(True)
        keep = torch.rand(shape[0], 1, *shape[2:]) < 0.3 + 0.1 * step
        grad = torch.randn(shape, dtype=torch.float64)
        out = sums(x, keep)
        expected = indexed.forward_indexed(x, keep)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(out, (x, sums.weight, sums.bias), grad)
        want = torch.autograd.grad(expected, (x, indexed.weight, indexed.bias), grad)
        for name, g, w in zip(("x", "weight", "bias"), got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"step {step}: grad of {name}")
        torch.testing.assert_close(sums.running_mean, indexed.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(sums.running_var, indexed.running_var, rtol=1e-12, atol=1e-14)
        assert sums.num_batches_tracked.item() == indexed.num_batches_tracked.item() == step + 1
    assert not torch.allclose(sums.running_var, torch.ones(4, dtype=torch.float64))  # the statistics moved
    sums.eval()
    indexed.eval()
    x = torch.randn(shape, dtype=torch.float64)
    keep = torch.rand(shape[0], 1, *shape[2:]) < 0.5
    torch.testing.assert_close(sums(x, keep), indexed.forward_indexed(x, keep), rtol=1e-12, atol=1e-12)


def test_masked_sums_batchnorm_control_all_positions_differ_from_visible_only():
    """Control for the test above: plain BatchNorm statistics (masked positions counted) differ."""
    torch.manual_seed(5)
    bn = MaskedBatchNorm2d(4).double()
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 3 + 2
    keep = torch.rand(6, 1, 5, 5) < 0.4
    masked_input = x * keep
    plain = copy.deepcopy(bn)(masked_input).masked_fill(~keep, 0.0)
    assert not torch.allclose(bn(masked_input, keep), plain, rtol=1e-3)


def test_masked_sums_batchnorm_in_bfloat16_keeps_float32_statistics():
    torch.manual_seed(6)
    bn = MaskedBatchNorm2d(4)
    x = torch.randn(6, 4, 5, 5) * 3 + 2
    keep = torch.rand(6, 1, 5, 5) < 0.4
    reference = copy.deepcopy(bn)
    expected = reference.forward_indexed(x, keep)
    got = bn.to(torch.bfloat16)(x.to(torch.bfloat16), keep)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    torch.testing.assert_close(bn.running_mean.float(), reference.running_mean, rtol=1e-2, atol=1e-3)
