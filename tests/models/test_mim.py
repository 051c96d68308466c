"""Masked image modelling: masks, sparse (leak-free) encoder path, decoder, loss, export, grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import models
from models.mim import (
    MaskedImageModel,
    extract_encoder_state_dict,
    patchify,
    reconstruct_images,
    reconstruction_grid,
    unpatchify,
)
from models.spikformer import Spikformer, VisibleMask

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_encoder(**kwargs) -> Spikformer:
    """32 px, stride 4 -> 8x8 tokens, D=64, 2 blocks."""
    return models.create("spikformer_v2_tiny", **kwargs)


def tiny_mim(seed: int = 0, encoder_kwargs: dict | None = None, **kwargs) -> MaskedImageModel:
    torch.manual_seed(seed)
    kwargs = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, **kwargs}
    return MaskedImageModel(tiny_encoder(**(encoder_kwargs or {})), **kwargs)


def smooth_images(batch: int, size: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Blurry random images (normalised-looking): structure a decoder can partly predict."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").to(dtype)


# --------------------------------------------------------------------------------------------------
# Shapes and patch geometry
# --------------------------------------------------------------------------------------------------


def test_shapes_with_default_patch_size_equal_to_the_token_stride():
    model = tiny_mim()
    assert model.patch_size == 4 and model.num_patches == 64
    loss, pred, mask = model(smooth_images(3))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert pred.shape == (3, 64, 4 * 4 * 3)
    assert mask.shape == (3, 64) and mask.dtype == torch.bool


def test_shapes_at_stride_16_give_16_pixel_patches():
    torch.manual_seed(0)
    encoder = Spikformer(img_size=64, num_classes=5, embed_dim=32, depth=1, num_heads=2, T=1, stem="scs",
                         scs_extra_convs=(0, 0, 0, 1))
    model = MaskedImageModel(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    assert model.patch_size == 16 and model.grid_size == (4, 4)
    _, pred, mask = model(torch.randn(2, 3, 64, 64))
    assert pred.shape == (2, 16, 16 * 16 * 3) and mask.sum(1).tolist() == [10, 10]  # round(16 * 0.6)


def test_patch_size_multiple_of_stride_masks_groups_of_tokens():
    model = tiny_mim(patch_size=8)
    mask = model.random_mask(2, "cpu")
    assert mask.shape == (2, 16)
    active = model.token_active(mask, model.grid_size)
    assert active.shape == (2, 1, 8, 8)
    # each 2x2 group of tokens shares its patch's visibility
    assert torch.equal(active[:, 0, ::2, ::2].flatten(1), ~mask)
    assert torch.equal(active[:, 0, 1::2, 1::2].flatten(1), ~mask)
    _, pred, _ = model(smooth_images(2), mask)
    assert pred.shape == (2, 16, 8 * 8 * 3)
    assert model.forward_encoder(smooth_images(2), mask).shape == (2, 16, 64)


@pytest.mark.parametrize("patch_size", [6, 2])
def test_patch_size_not_a_multiple_of_the_stride_is_rejected(patch_size):
    with pytest.raises(ValueError, match=rf"patch_size {patch_size} .* stride 4"):
        MaskedImageModel(tiny_encoder(), patch_size=patch_size)


def test_patchify_roundtrip_and_layout():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch 1 (row 0, column 1) holds pixels [0:4, 4:8], flattened as (p, p, C)
    assert torch.equal(patches[:, 1], images[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(2, 48))
    assert torch.equal(unpatchify(patches, 4, (2, 3), 3), images)


def test_decoder_position_embedding_is_a_fixed_buffer():
    model = tiny_mim()
    names = {name for name, _ in model.named_parameters()}
    assert "decoder_pos_embed" not in names and "decoder_pos_embed" not in model.state_dict()
    assert model.decoder_pos_embed.shape == (1, 64, 32) and not model.decoder_pos_embed.requires_grad
    assert "mask_token" in names and model.no_weight_decay() == {"mask_token"}


# --------------------------------------------------------------------------------------------------
# Masks and loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.75, 0.9])
def test_exactly_round_l_times_ratio_patches_masked_per_sample(ratio):
    model = tiny_mim(mask_ratio=ratio)
    mask = model.random_mask(16, "cpu", generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (16, 64)
    assert mask.sum(dim=1).tolist() == [round(64 * ratio)] * 16
    assert len({tuple(row.tolist()) for row in mask}) == 16  # per-sample masks differ
    again = model.random_mask(16, "cpu", generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)


def test_mask_ratio_that_masks_nothing_or_everything_is_rejected():
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mim(mask_ratio=1.0)
    with pytest.raises(ValueError, match="masks 0 of 4 patches"):
        tiny_mim(mask_ratio=0.1, patch_size=16)  # 2x2 patches, round(0.4) = 0


def test_given_mask_is_validated_and_float_masks_are_accepted():
    model = tiny_mim()
    images = smooth_images(2)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 64\)"):
        model(images, torch.zeros(2, 16, dtype=torch.bool))
    mask = model.random_mask(2, "cpu")
    loss_bool, _, _ = model.eval()(images, mask)
    loss_float, _, returned = model(images, mask.float())
    assert returned.dtype == torch.bool and torch.equal(returned, mask)
    assert torch.equal(loss_bool, loss_float)


def test_loss_depends_only_on_masked_patches():
    model = tiny_mim()
    images = smooth_images(2)
    with torch.no_grad():
        loss, pred, mask = model(images)
        changed_visible = pred.clone()
        changed_visible[~mask] += 5.0
        changed_masked = pred.clone()
        changed_masked[mask] += 5.0
        assert torch.equal(model.forward_loss(images, changed_visible, mask), loss)
        assert model.forward_loss(images, changed_masked, mask) > loss + 1.0
        # and it is the per-patch-normalised MSE
        target = patchify(images, 4)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        expected = ((pred - target) ** 2).mean(-1)[mask].mean()
        torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------------------------------
# No leak from masked pixels (item 4), and the all-tokens choice (item 1)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("patch_size", "T"), [(4, 1), (8, 1), (4, 2)])
def test_masked_pixels_do_not_leak_into_visible_tokens(patch_size, T):
    model = tiny_mim(patch_size=patch_size, encoder_kwargs={"T": T}).double().train()
    images = smooth_images(4, dtype=torch.float64)
    mask = model.random_mask(4, "cpu", generator=torch.Generator().manual_seed(3))
    pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, patch_size**2 * 3).double(), patch_size,
                            model.grid_size, 3).bool()
    noise = 3.0 * torch.randn(images.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    altered = torch.where(pixel_mask, noise, images)
    assert not torch.equal(altered, images)

    with torch.no_grad():
        tokens = model.forward_encoder(images, mask)
        tokens_altered = model.forward_encoder(altered, mask)
        visible = ~mask
        assert tokens[visible].abs().sum() > 0  # the encoder fires: the comparison is not 0 == 0
        assert torch.equal(tokens[visible], tokens_altered[visible])  # exactly
        assert not tokens[mask].any() and not tokens_altered[mask].any()  # masked come out as zeros
        # the decoder sees only visible tokens and mask tokens: the whole prediction is unchanged
        _, pred, _ = model(images, mask)
        _, pred_altered, _ = model(altered, mask)
        assert torch.equal(pred, pred_altered)

        # control: the same change does reach visible tokens of the dense (unmasked) encoder
        dense = model.forward_encoder(images, None)
        dense_altered = model.forward_encoder(altered, None)
        assert not torch.equal(dense[visible], dense_altered[visible])


def test_all_tokens_with_masked_zeroed_equal_running_the_blocks_on_visible_tokens_only():
    """Why dropping masked tokens (MAE) would only save compute: the blocks give the same output."""
    torch.manual_seed(0)
    encoder = tiny_encoder(T=2).double().train()
    images = smooth_images(3, dtype=torch.float64)
    model = MaskedImageModel(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    mask = model.random_mask(3, "cpu", generator=torch.Generator().manual_seed(5))
    active = model.token_active(mask, model.grid_size)
    vmask = VisibleMask(active, encoder.T)
    with torch.no_grad():
        stem = vmask.apply_seq(encoder.patch_embed(encoder._encode_input(images), vmask))  # [T, B, D, 8, 8]
        all_tokens = stem
        for block in encoder.block:
            all_tokens = block(all_tokens, vmask)
        # visible-only: gather the same number of visible tokens per sample into a 1 x n grid
        index = (~mask).nonzero()[:, 1].reshape(3, -1)  # [B, n_visible]
        gather = index[None, :, None, :].expand(2, 3, 64, -1)
        compact = stem.flatten(3).gather(3, gather).unsqueeze(3)  # [T, B, D, 1, n_visible]
        for block in encoder.block:
            compact = block(compact, None)
        expected = all_tokens.flatten(3).gather(3, gather).unsqueeze(3)
        assert expected.abs().sum() > 0
        torch.testing.assert_close(compact, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Training, export, visualisation
# --------------------------------------------------------------------------------------------------


def test_gradients_reach_the_encoder_but_not_its_unused_head():
    model = tiny_mim()
    loss, _, _ = model(smooth_images(2))
    loss.backward()
    assert model.encoder.patch_embed.proj_conv.weight.grad.abs().sum() > 0
    assert model.encoder.block[-1].mlp.fc2_conv.weight.grad.abs().sum() > 0
    assert model.encoder.head.weight.grad is None and not model.encoder.head.weight.requires_grad
    assert model.mask_token.grad.abs().sum() > 0


def test_a_few_optimisation_steps_reduce_the_loss():
    model = tiny_mim().train()
    images = smooth_images(4, seed=7)
    mask = model.random_mask(4, "cpu", generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(20):
        loss, _, _ = model(images, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses  # measured: 1.79 -> 0.93


def test_encoder_state_dict_loads_into_a_fresh_classifier_except_the_head():
    model = tiny_mim()
    with torch.no_grad():  # make the encoder weights differ from a fresh model's
        model.encoder.patch_embed.proj_conv.weight.add_(1.0)
    state = model.encoder_state_dict()
    foreign = ("head.", "encoder.", "decoder", "mask_token", "latent_norm")
    assert not any(key.startswith(foreign) for key in state)
    fresh = tiny_encoder()
    result = fresh.load_state_dict(state, strict=False)
    head_keys = sorted(key for key in fresh.state_dict() if key.startswith("head."))
    assert head_keys == ["head.bias", "head.weight"]
    assert sorted(result.missing_keys) == head_keys and result.unexpected_keys == []
    for key, value in fresh.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, model.encoder.state_dict()[key]), key
    # the same extraction works on a full (e.g. consolidated ZeRO-3) state_dict
    assert extract_encoder_state_dict(model.state_dict()).keys() == state.keys()


def test_perfect_prediction_reconstructs_the_image():
    model = tiny_mim()
    images = smooth_images(2)
    mask = model.random_mask(2, "cpu")
    recon = reconstruct_images(images, model.targets(images), mask, 4, norm_pix_loss=True)
    torch.testing.assert_close(recon, images, rtol=1e-4, atol=1e-4)
    raw = tiny_mim(norm_pix_loss=False)
    recon_raw = reconstruct_images(images, raw.targets(images), mask, 4, norm_pix_loss=False)
    assert torch.equal(recon_raw, images)


def test_reconstruction_grid_png_has_the_expected_size(tmp_path):
    model = tiny_mim()
    images = smooth_images(10)
    with torch.no_grad():
        _, pred, mask = model(images)
    grid = reconstruction_grid(images, pred, mask, model.patch_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert grid.size == (8 * (32 + 2) + 2, 3 * (32 + 2) + 2) and grid.mode == "RGB"  # max_images=8
    path = tmp_path / "grid.png"
    grid.save(path)
    with Image.open(path) as reopened:
        assert reopened.format == "PNG" and reopened.size == grid.size
    # visible patches of the reconstruction row equal the original row; masked input row is grey there
    pixels = torch.from_numpy(np.asarray(grid).copy()).permute(2, 0, 1)
    original, masked, recon = (pixels[:, 2 + r * 34: 34 + r * 34, 2:34] for r in range(3))
    visible = ~unpatchify(mask[:1].unsqueeze(-1).expand(-1, -1, 48).float(), 4, (8, 8), 3).bool()[0]
    assert torch.equal(recon[visible], original[visible])
    assert torch.equal(masked[~visible], torch.full_like(masked[~visible], 128))

    gray = reconstruction_grid(images[:3, :1], pred[:3, :, :16], mask[:3], 4, (0.5,), (0.25,), scale=2)
    assert gray.size == (2 * (3 * 34 + 2), 2 * (3 * 34 + 2)) and gray.mode == "L"
