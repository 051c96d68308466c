"""Masked image modelling (MIM) for Spikformer: SparK-style sparse spiking encoder + light ViT decoder.

Pretraining recipe (DESIGN.md §3, spec §3.1; closest public code is the spike-MAE of Spike-Driven
Transformer V3, which shares a co-author with Spikformer V2):

* Every sample gets its own random mask over ``patch_size`` pixel patches (default: the encoder's
  token stride, 16 px at 224 px), exactly ``round(L * mask_ratio)`` of the L patches masked.
* The encoder is the classifier itself. Its stem runs dense, SparK style
  (``Spikformer.forward_tokens(x, active)``): masked pixels are zeroed, the mask is re-applied after
  every conv / BN / pooling, and BatchNorm statistics come from visible positions only. No value at a
  visible position depends on a masked pixel (``tests/models/test_mim.py`` checks this exactly in
  float64).
* Then, MAE style, only the visible tokens go on (``encoder_path="visible"``, the default,
  ``Spikformer.forward_visible``): every sample masks the same number of patches, so the visible
  tokens gather into a static [T, B, D, n] tensor, and the token-grid layers of the stem and all
  blocks run on those n tokens only. This is the same function as the dense path: a zeroed token adds
  nothing to ``K^T V``, every other operator is per token, and a plain BatchNorm over the gathered
  tokens is the visible-only BatchNorm. ``encoder_path="dense"`` keeps the original computation
  (all tokens, masked ones zeroed through the blocks, BatchNorms by boolean indexing) as the
  reference; ``tests/models/test_mim_fast_path.py`` checks that both give the same loss and gradients.
* The decoder is a light non-spiking transformer (timm ``Block``s with LayerNorm): the visible encoder
  tokens are embedded, masked positions are filled with a learnable mask token, a fixed 2-D sin-cos
  position embedding is added, and a linear layer predicts the pixels of every patch.
* Targets are per-patch normalised pixels ``(x - mean) / sqrt(var + 1e-6)`` (``norm_pix_loss``; MAE's
  convention, unbiased variance); the loss is the MSE over masked patches only.

Why the stem stays dense: it is a stack of 3x3 convolutions and max-pools (and a 3x3 relative-
position conv), which need the 2-D grid with its holes (SparK's "sparse" convolution). Spiking
Self-Attention has no position embedding: a token's position lives only in the features the stem
gave it, so after the stem the tokens can travel as a bag. The fast path still computes the stem's
token-grid convs only at visible output positions (unfold + gather + one GEMM, exact).

The spiking encoder's output is the mean over T of ``[T, B, D, h, w]``. Token groups are
average-pooled to patches when ``patch_size`` is a multiple of the stride. The output passes a
LayerNorm before the decoder embedding. The encoder has no final norm (its residual stream is a
spike count), and the LayerNorm gives the decoder well-scaled inputs. It is per-token, so it cannot
leak, and ``encoder_state_dict`` does not export it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block as ViTBlock
from torch import nn

logger = logging.getLogger(__name__)

NORM_PIX_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Patch helpers (MAE's layout: a patch is its p x p x C pixels, row-major over the patch grid)
# --------------------------------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] with L = (H/p) * (W/p), each patch flattened as (p, p, C)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> torch.Tensor:
    """Inverse of ``patchify``: [B, L, p*p*C] -> [B, C, h*p, w*p]."""
    B, L, _ = patches.shape
    h, w = grid
    p = patch_size
    if L != h * w or patches.shape[-1] != p * p * in_chans:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit a {h}x{w} grid of {p}x{p}x{in_chans}"
        )
    x = patches.reshape(B, h, w, p, p, in_chans)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, in_chans, h * p, w * p)


def normalize_patches(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch normalised pixels and the (mean, var) used: ``(x - mean) / sqrt(var + 1e-6)``."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as in MAE
    return (patches - mean) / (var + NORM_PIX_EPS).sqrt(), mean, var


def extract_encoder_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "encoder.") -> dict:
    """Encoder weights of a full ``MaskedImageModel`` state_dict under the classifier's names, no head.

    Use it on a consolidated checkpoint (e.g. DeepSpeed ZeRO-3's fp32 export), where the live
    module's own ``state_dict`` holds only partitions.
    """
    out = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not out:
        raise KeyError(f"no '{prefix}*' keys in the state_dict; first keys: {list(state_dict)[:5]}")
    return {key: value for key, value in out.items() if not key.startswith("head.")}


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [1, h*w, dim] for a row-major (h, w) grid."""
    if dim % 4:
        raise ValueError(f"decoder_dim must be divisible by 4 for a 2-D sin-cos embedding, got {dim}")
    return build_sincos2d_pos_embed(list(grid), dim=dim).unsqueeze(0)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class MaskedImageModel(nn.Module):
    """Spikformer encoder + light non-spiking transformer decoder for masked image modelling.

    Args:
        encoder: a ``Spikformer`` classifier; its head is unused (frozen here), its ``T`` is the
            pretraining T.
        patch_size: mask/target patch size in pixels; default the encoder's token stride. A multiple
            of the stride masks square groups of tokens.
        mask_ratio: fraction of patches masked per sample, in (0, 1).
        decoder_dim, decoder_depth, decoder_heads: decoder width (divisible by 4), blocks, heads.
        norm_pix_loss: predict per-patch normalised pixels (True) or raw (normalised-image) pixels.
        encoder_path: "visible" (default: blocks over the visible tokens only, static shapes) or
            "dense" (the original all-token path with boolean-indexing BatchNorms, kept as the oracle).

    ``forward(images, mask=None) -> (loss, pred [B, L, p*p*C], mask [B, L] bool, True = masked)``.
    """

    ENCODER_PATHS = ("visible", "dense")

    def __init__(
        self,
        encoder: nn.Module,
        *,
        patch_size: int | None = None,
        mask_ratio: float = 0.6,
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
        encoder_path: str = "visible",
    ) -> None:
        super().__init__()
        if encoder_path not in self.ENCODER_PATHS:
            raise ValueError(f"encoder_path must be one of {self.ENCODER_PATHS}, got {encoder_path!r}")
        needed = ("forward_tokens", "patch_stride", "embed_dim", "in_chans", "img_size")
        for attr in needed + (("forward_visible",) if encoder_path == "visible" else ()):
            if not hasattr(encoder, attr):
                raise ValueError(f"encoder {type(encoder).__name__} has no '{attr}': pass a Spikformer")
        self.encoder_path = encoder_path
        stride = int(encoder.patch_stride)
        patch_size = stride if patch_size is None else int(patch_size)
        if patch_size < stride or patch_size % stride:
            raise ValueError(
                f"patch_size {patch_size} must be a multiple of the encoder's token stride {stride}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.patch_size = patch_size
        self.tokens_per_patch = patch_size // stride  # along each side
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = int(encoder.in_chans)
        self.grid_size = self.patch_grid(encoder.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.masked_per_sample(self.num_patches)  # fail early on a ratio that masks 0 or all patches

        # the classifier head is not part of pretraining; frozen so that no engine sees unused grads
        head = getattr(encoder, "head", None)
        if head is not None:
            head.requires_grad_(False)

        enc_dim = int(encoder.embed_dim)
        self.latent_norm = nn.LayerNorm(enc_dim)
        self.decoder_embed = nn.Linear(enc_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # fixed, not learned, and rebuilt from the shape: kept out of checkpoints
        pos_embed = sincos_pos_embed(self.grid_size, decoder_dim)
        self.register_buffer("decoder_pos_embed", pos_embed, persistent=False)
        self.decoder_blocks = nn.ModuleList(
            ViTBlock(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * self.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's init, applied to the new modules only (the encoder keeps its own)."""
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.latent_norm, self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                       self.decoder_pred):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # --- geometry and masks -----------------------------------------------------------------------

    def patch_grid(self, size: int | Sequence[int]) -> tuple[int, int]:
        """Patch grid (h, w) of an image size; the size must be divisible by ``patch_size``."""
        height, width = (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the MIM patch size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def masked_per_sample(self, num_patches: int) -> int:
        """round(L * mask_ratio), checked to leave at least one masked and one visible patch."""
        count = round(num_patches * self.mask_ratio)
        if not 0 < count < num_patches:
            raise ValueError(
                f"mask_ratio {self.mask_ratio} masks {count} of {num_patches} patches; "
                "need at least one masked and one visible patch"
            )
        return count

    def random_mask(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Bool [B, L] (True = masked), exactly round(L * mask_ratio) masked patches per sample.

        ``grid_size`` defaults to the encoder's image size; ``generator`` may live on any device.
        """
        grid = self.grid_size if grid_size is None else tuple(grid_size)
        num_patches = grid[0] * grid[1]
        count = self.masked_per_sample(num_patches)
        noise_device = generator.device if generator is not None else device
        noise = torch.rand(batch_size, num_patches, generator=generator, device=noise_device).to(device)
        order = noise.argsort(dim=1)
        mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
        return mask.scatter(1, order[:, :count], True)

    def token_active(self, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch mask [B, L] (True = masked) -> encoder visibility [B, 1, h, w] (True = visible)."""
        k, (h, w), B = self.tokens_per_patch, grid, mask.shape[0]
        visible = ~mask.reshape(B, 1, h, 1, w, 1)
        return visible.expand(B, 1, h, k, w, k).reshape(B, 1, h * k, w * k)  # static shapes, no host sync

    def visible_index(
        self, mask: torch.Tensor, grid: tuple[int, int], num_masked: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch index [B, n], token index [B, n * k^2]) of the visible patches, every sample masking
        exactly ``num_masked`` patches: patches in ascending order, their k x k tokens (positions in the
        row-major token grid) patch by patch. Sorting keeps the shapes static (no ``nonzero``)."""
        visible = mask.shape[1] - num_masked
        patch_index = torch.argsort(mask.to(torch.int32), dim=1, stable=True)[:, :visible]
        k = self.tokens_per_patch
        if k == 1:
            return patch_index, patch_index
        rows, cols = patch_index // grid[1], patch_index % grid[1]
        offsets = torch.arange(k, device=mask.device)
        token_rows = (rows * k)[..., None, None] + offsets[:, None]  # [B, n, k, 1]
        token_cols = (cols * k)[..., None, None] + offsets[None, :]  # [B, n, 1, k]
        return patch_index, (token_rows * (grid[1] * k) + token_cols).flatten(1)

    def _check_mask(self, mask: torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
        if tuple(mask.shape) != (batch, num_patches):
            raise ValueError(f"mask must have shape {(batch, num_patches)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("a non-bool mask must hold only 0 (visible) and 1 (masked)")
            mask = mask.bool()
        if not mask.any() or mask.all():
            raise ValueError("the mask must leave at least one patch masked and one visible in the batch")
        return mask

    @staticmethod
    def _uniform_count(mask: torch.Tensor) -> int | None:
        """Masked patches per sample if every sample masks the same number, else None (a host read:
        given masks only; random masks have a count known from the shapes)."""
        counts = mask.sum(dim=1)
        return int(counts[0]) if bool((counts == counts[0]).all()) else None

    # --- forward ----------------------------------------------------------------------------------

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Encoder tokens per patch [B, L, D] (before the decoder's LayerNorm), by the model's path.

        With a mask (True = masked) the encoder runs sparse: masked pixels never reach visible
        positions and masked patches come out as zeros. ``mask=None`` runs it densely (no masking).
        """
        count = None if mask is None or self.encoder_path == "dense" else self._uniform_count(mask)
        if count is None:
            return self.forward_encoder_dense(images, mask)
        latent, index = self.forward_encoder_visible(images, mask, count)
        B, L, D = mask.shape[0], mask.shape[1], latent.shape[-1]
        return latent.new_zeros(B, L, D).scatter(1, index.unsqueeze(-1).expand(-1, -1, D), latent)

    def forward_encoder_dense(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The all-token path: [B, L, D], masked patches zero; the reference BatchNorms on the dense path."""
        grid = self.patch_grid(images.shape)
        active = None if mask is None else self.token_active(mask, grid)
        indexed = self.encoder_path == "dense"
        tokens = self.encoder.forward_tokens(images, active, indexed_bn=indexed).mean(dim=0)  # [B, D, h, w]
        if self.tokens_per_patch > 1:
            tokens = F.avg_pool2d(tokens, self.tokens_per_patch)
        return tokens.flatten(2).transpose(1, 2)

    def forward_encoder_visible(
        self, images: torch.Tensor, mask: torch.Tensor, num_masked: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens of the visible patches [B, n, D], their patch index [B, n]): the fast path."""
        grid = self.patch_grid(images.shape)
        patch_index, token_index = self.visible_index(mask, grid, num_masked)
        tokens = self.encoder.forward_visible(images, self.token_active(mask, grid), token_index).mean(dim=0)
        group = self.tokens_per_patch**2
        if group > 1:  # [B, D, n * k^2] patch by patch -> mean of each patch's tokens
            tokens = tokens.unflatten(2, (-1, group)).mean(dim=-1)
        return tokens.transpose(1, 2), patch_index

    def _pos_embed(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        if grid == self.grid_size:
            return self.decoder_pos_embed
        return sincos_pos_embed(grid, self.decoder_pos_embed.shape[-1]).to(like)

    def forward_decoder(
        self, latent: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Predicted pixels [B, L, p*p*C] from encoder tokens [B, L, D] and the mask [B, L]."""
        x = self.decoder_embed(self.latent_norm(latent))
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        return self._decode(x, grid)

    def forward_decoder_visible(
        self, latent: torch.Tensor, patch_index: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Predicted pixels [B, L, p*p*C] from the visible patches' tokens [B, n, D] (MAE's layout):
        embedded, placed at their patches, mask tokens everywhere else."""
        x = self.decoder_embed(self.latent_norm(latent))
        B, _, width = x.shape
        full = self.mask_token.to(x.dtype).expand(B, grid[0] * grid[1], width)
        x = full.scatter(1, patch_index.unsqueeze(-1).expand(-1, -1, width), x)
        return self._decode(x, grid)

    def _decode(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self._pos_embed(grid, x)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch targets [B, L, p*p*C]: normalised per patch when ``norm_pix_loss``."""
        patches = patchify(images, self.patch_size)
        return normalize_patches(patches)[0] if self.norm_pix_loss else patches

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch, averaged over the masked patches only."""
        # float32 at least: per-patch variance and the MSE are too coarse in bf16
        dtype = torch.promote_types(pred.dtype, torch.float32)
        per_patch = (pred.to(dtype) - self.targets(images.to(dtype))).pow(2).mean(dim=-1)
        weights = mask.to(per_patch.dtype)
        return (per_patch * weights).sum() / weights.sum()

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred [B, L, p*p*C], mask [B, L] bool, True = masked); random mask when None.

        The visible-token path needs the same number of masked patches in every sample: always true
        of the random masks; a given mask that differs per sample runs the dense path (same function).
        """
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got shape {tuple(images.shape)}")
        grid = self.patch_grid(images.shape)
        batch, num_patches = images.shape[0], grid[0] * grid[1]
        if mask is None:
            mask = self.random_mask(batch, images.device, grid_size=grid)
            count = self.masked_per_sample(num_patches)  # from the shapes: no host read
        else:
            mask = self._check_mask(mask.to(images.device), batch, num_patches)
            count = self._uniform_count(mask)
        if self.encoder_path == "visible" and count is not None:
            latent, patch_index = self.forward_encoder_visible(images, mask, count)
            pred = self.forward_decoder_visible(latent, patch_index, grid)
        else:
            pred = self.forward_decoder(self.forward_encoder_dense(images, mask), mask, grid)
        return self.forward_loss(images, pred, mask), pred, mask

    # --- export and optimiser conventions ---------------------------------------------------------

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under the classifier's parameter names, without ``head.*``.

        A classifier of the same variant loads it with ``load_state_dict(sd, strict=False)``, reporting
        exactly the head keys as missing and nothing unexpected.
        """
        return extract_encoder_state_dict(self.state_dict())

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names timm's parameter groups exempt from weight decay (besides biases and norms)."""
        return {"mask_token"}


# --------------------------------------------------------------------------------------------------
# Visualisation
# --------------------------------------------------------------------------------------------------


def reconstruct_images(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool = True,
) -> torch.Tensor:
    """Visible original pixels + predicted masked patches, in the images' (normalised) space.

    With ``norm_pix_loss`` the prediction is de-normalised with each original patch's own mean and
    variance (the loss target's statistics).
    """
    patches = patchify(images, patch_size)
    if norm_pix_loss:
        _, mean, var = normalize_patches(patches)
        pred = pred * (var + NORM_PIX_EPS).sqrt() + mean
    mixed = torch.where(mask.bool().unsqueeze(-1), pred.to(patches.dtype), patches)
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    return unpatchify(mixed, patch_size, grid, images.shape[1])


def _tile(rows: list[torch.Tensor], pad: int) -> torch.Tensor:
    """Rows of [n, C, H, W] images -> one [C, rows*(H+pad)+pad, n*(W+pad)+pad] canvas (white gaps)."""
    n, C, H, W = rows[0].shape
    canvas = torch.ones(C, len(rows) * (H + pad) + pad, n * (W + pad) + pad)
    for r, row in enumerate(rows):
        for i, image in enumerate(row):
            top, left = pad + r * (H + pad), pad + i * (W + pad)
            canvas[:, top:top + H, left:left + W] = image
    return canvas


@torch.no_grad()
def reconstruction_grid(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_images: int = 8,
    *,
    norm_pix_loss: bool = True,
    pad: int = 2,
    scale: int = 1,
) -> Image.Image:
    """A PNG-ready grid: row 1 originals, row 2 masked inputs (grey patches), row 3 reconstructions.

    ``images`` are the normalised model inputs [B, C, H, W]; ``mean``/``std`` undo that normalisation.
    One column per image (at most ``max_images``), ``pad`` white pixels between tiles, and the whole
    picture enlarged ``scale`` times (nearest) for small inputs. Size before scaling:
    ``(n * (W + pad) + pad, 3 * (H + pad) + pad)``.
    """
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"reconstruction_grid draws 1- or 3-channel images, got {channels} channels")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need {channels} values each")
    n = min(images.shape[0], max_images)
    images, pred, mask = images[:n].float().cpu(), pred[:n].float().cpu(), mask[:n].bool().cpu()
    recon = reconstruct_images(images, pred, mask, patch_size, norm_pix_loss)

    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        return (x * std_t + mean_t).clamp(0.0, 1.0)

    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    pixel_mask = unpatchify(mask.unsqueeze(-1).float().expand(-1, -1, patch_size * patch_size * channels),
                            patch_size, grid, channels).bool()
    original = to_pixels(images)
    masked = original.masked_fill(pixel_mask, 0.5)
    canvas = _tile([original, masked, to_pixels(recon)], pad)
    if scale > 1:
        canvas = canvas.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = (canvas * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if channels == 1 else array)  # uint8 HxW -> "L", HxWx3 -> "RGB"
