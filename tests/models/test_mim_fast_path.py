"""MIM's visible-token fast path computes the same function as the dense reference path.

The reference (``encoder_path="dense"``) is the original computation: all tokens through the blocks
with masked ones zeroed, BatchNorms by boolean indexing. The fast path (the default) gathers the
visible tokens after the stem's dense layers and runs the stem's token-grid layers and every block
on them alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

import models
from models.energy import count_flops
from models.mim import MaskedImageModel
from models.spikformer import Spikformer, VisibleConv2d, VisibleTokens

pytestmark = pytest.mark.usefixtures("one_thread")


def pair(dtype=torch.float64, patch_size=None, **encoder_kwargs) -> tuple[MaskedImageModel, MaskedImageModel]:
    """(fast, reference) with the same weights: the tiny variant, 8x8 tokens of stride 4."""
    torch.manual_seed(0)
    encoder = models.create("spikformer_v2_tiny", **encoder_kwargs)
    fast = MaskedImageModel(encoder, patch_size=patch_size, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    fast = fast.to(dtype).train()
    reference = copy.deepcopy(fast)
    reference.encoder_path = "dense"
    return fast, reference


def images(batch: int = 3, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same_step(fast, reference, x, mask, rtol, atol):
    """One training forward/backward on each: loss, prediction, every gradient, every BN buffer."""
    loss_f, pred_f, _ = fast(x, mask)
    loss_r, pred_r, _ = reference(x, mask)
    loss_f.backward()
    loss_r.backward()
    torch.testing.assert_close(loss_f, loss_r, rtol=rtol, atol=0)
    torch.testing.assert_close(pred_f, pred_r, rtol=rtol, atol=atol)
    g_fast, g_ref = grads(fast), grads(reference)
    assert g_fast.keys() == g_ref.keys() and len(g_ref) > 50
    scale = max(g.abs().max().item() for g in g_ref.values())
    for name, g in g_ref.items():
        # atol relative to the largest gradient: a conv bias before a BatchNorm has a gradient that is
        # zero in exact arithmetic, so its relative difference is pure rounding
        torch.testing.assert_close(g_fast[name], g, rtol=rtol, atol=atol * scale, msg=name)
    for (name, b_fast), b_ref in zip(fast.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b_fast, b_ref, rtol=rtol, atol=atol, msg=name)
    return loss_f


@pytest.mark.parametrize(("patch_size", "T"), [(None, 1), (8, 1), (None, 2)])
def test_fast_path_equals_dense_reference_in_float64(patch_size, T):
    fast, reference = pair(patch_size=patch_size, T=T)
    x = images()
    mask = fast.random_mask(3, "cpu", generator=torch.Generator().manual_seed(2))
    loss = assert_same_step(fast, reference, x, mask, rtol=1e-10, atol=1e-12)
    assert loss > 0
    # eval mode (running statistics) too, after the training step moved them
    fast.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x, mask)[1], reference(x, mask)[1], rtol=1e-10, atol=1e-12)


def test_the_no_lif_control_takes_the_same_fast_path():
    """neuron="relu": real-valued activations everywhere, and still the dense reference's function."""
    fast, reference = pair(patch_size=8, neuron="relu")
    x = images()
    mask = fast.random_mask(3, "cpu", generator=torch.Generator().manual_seed(2))
    loss = assert_same_step(fast, reference, x, mask, rtol=1e-10, atol=1e-12)
    assert loss > 0


def test_fast_path_equals_dense_reference_in_float32_with_the_random_mask():
    fast, reference = pair(dtype=torch.float32)
    x = images(4, torch.float32)
    torch.manual_seed(7)
    mask = fast.random_mask(4, "cpu")  # the mask forward(images) draws, drawn once for both
    assert_same_step(fast, reference, x, mask, rtol=1e-4, atol=1e-4)  # measured: 2e-5 of the largest grad


def test_sps_stem_and_a_wider_grid_also_match():
    torch.manual_seed(0)
    encoder = Spikformer(img_size=48, num_classes=0, embed_dim=32, depth=1, num_heads=2, T=1, stem="sps", stem_pools=2)
    fast = MaskedImageModel(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2, mask_ratio=0.75).double()
    reference = copy.deepcopy(fast)
    reference.encoder_path = "dense"
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    mask = fast.random_mask(2, "cpu", generator=torch.Generator().manual_seed(3))  # 12x12 grid, 36 visible
    assert_same_step(fast, reference, x, mask, rtol=1e-10, atol=1e-12)


def test_forward_visible_equals_forward_tokens_at_the_index_in_any_order():
    torch.manual_seed(0)
    model = models.create("spikformer_v2_tiny", T=2).double()
    mim = MaskedImageModel(model, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = images(2)
    mask = mim.random_mask(2, "cpu", generator=torch.Generator().manual_seed(4))
    active = mim.token_active(mask, mim.grid_size)
    patch_index, token_index = mim.visible_index(mask, mim.grid_size, mim.masked_per_sample(64))
    assert torch.equal(patch_index, token_index) and token_index.shape == (2, 26)
    assert active.flatten(1).gather(1, token_index).all()  # the index lists visible tokens only
    shuffled = token_index[:, torch.randperm(26, generator=torch.Generator().manual_seed(5))]
    dense = copy.deepcopy(model).forward_tokens(x, active).flatten(3)  # [T, B, D, 64]
    for index in (token_index, shuffled):
        out = copy.deepcopy(model).forward_visible(x, active, index)
        expected = dense.gather(3, index[None, :, None, :].expand(2, -1, 64, -1))
        assert out.shape == (2, 2, 64, 26) and expected.abs().sum() > 0
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_control_gathering_masked_tokens_breaks_the_equality():
    """The equality test can fail: gathering the first n grid positions instead of the visible ones
    (masked tokens are zero after the dense stem layers, but the blocks' BatchNorms count them)."""
    fast, reference = pair()
    x = images()
    mask = fast.random_mask(3, "cpu", generator=torch.Generator().manual_seed(2))
    honest = fast.visible_index

    def first_positions(mask, grid, num_masked):
        patch_index, token_index = honest(mask, grid, num_masked)
        return patch_index, torch.arange(token_index.shape[1]).expand_as(token_index)

    with torch.no_grad():
        expected = reference(x, mask)[0]
        torch.testing.assert_close(fast(x, mask)[0], expected, rtol=1e-10, atol=0)
        fast.visible_index = first_positions
        assert abs(fast(x, mask)[0] - expected) > 1e-4 * expected  # measured: 1e-3 relative


def test_a_given_mask_with_unequal_counts_runs_the_dense_path():
    fast, reference = pair()
    x = images()
    mask = fast.random_mask(3, "cpu", generator=torch.Generator().manual_seed(2))
    mask[0, (~mask[0]).nonzero()[0]] = True  # sample 0 masks one patch more
    calls = []
    fast.encoder.forward_visible = lambda *a, **k: calls.append(1)  # must not be reached
    assert_same_step(fast, reference, x, mask, rtol=1e-10, atol=1e-12)
    assert not calls


def test_forward_encoder_per_patch_matches_the_reference():
    fast, reference = pair(patch_size=8)
    x = images()
    mask = fast.random_mask(3, "cpu", generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got, expected = fast.forward_encoder(x, mask), reference.forward_encoder(x, mask)
    assert got.shape == (3, 16, 64) and not got[mask].any()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_visible_conv_equals_the_dense_conv_at_visible_positions():
    torch.manual_seed(0)
    for kernel, dilation, padding, bias in ((3, 1, 1, False), (3, 2, 2, True), (1, 1, 0, True), (5, 1, 2, False)):
        conv = VisibleConv2d(6, 5, kernel, 1, padding, dilation=dilation, bias=bias).double()
        index = torch.stack([torch.randperm(35)[:12] for _ in range(2)])
        visible = VisibleTokens(index, (5, 7), T=2)
        tokens = torch.randn(4, 6, 12, dtype=torch.float64)
        expected = visible.gather(conv(visible.scatter(tokens)))
        torch.testing.assert_close(conv(tokens, visible), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="does not preserve"):
        VisibleConv2d(6, 5, 3, 1, 0)(tokens, visible)


def test_flop_count_sees_the_visible_work():
    """count_flops goes through the modules: the fast path's blocks and token-grid convs cost n / L."""
    torch.manual_seed(0)
    encoder = models.create("spikformer_v2_tiny", num_classes=0)
    mim = MaskedImageModel(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, mask_ratio=0.75)
    sparse = count_flops(mim, 32)
    dense_model = copy.deepcopy(mim)
    dense_model.encoder_path = "dense"
    dense = count_flops(dense_model, 32)
    visible = 64 - mim.masked_per_sample(64)
    for name in ("encoder.block.0.mlp.fc1_conv", "encoder.patch_embed.rpe_conv", "encoder.patch_embed.extra3.0.conv"):
        assert sparse[name] * 64 == dense[name] * visible, name
    assert sparse["encoder.patch_embed.proj_conv"] == dense["encoder.patch_embed.proj_conv"]  # dense stem layers


def test_encoder_path_is_validated():
    with pytest.raises(ValueError, match="encoder_path must be one of"):
        MaskedImageModel(models.create("spikformer_v2_tiny"), encoder_path="sparse")
