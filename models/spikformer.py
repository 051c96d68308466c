"""Spikformer V1 and V2: spiking stems (SPS, SCS), Spiking Self-Attention, and the classifier.

Layout: spiking tensors are ``[T, B, C, H, W]`` (or ``[T, B, C, N]`` inside attention); T is a real
dimension only inside the LIF neurons, convolutions and BatchNorms see ``T * B`` rows. The image is
repeated T times (direct encoding); logits = head(mean over T of the mean over tokens).

Module and parameter names follow the official V1 ImageNet code (ZK-Zhou/spikformer,
imagenet/model.py: ``patch_embed.proj_conv``, ``block.0.attn.q_conv``, ``block.0.mlp.fc1_conv``,
``head``) so that V1 checkpoints load by name (see ``models.checkpoint``). The official blocks also
build two LayerNorms they never call; we do not build them (the loader ignores their keys).

Masking hook for masked-image modelling (SparK style): ``forward_tokens(x, active)`` with ``active``
a bool tensor [B, 1, h, w] on the token grid (True = visible). Masked pixels are zeroed, the mask is
re-applied after every conv, BatchNorm and pooling, BatchNorms use visible positions only for their
batch statistics, and the token stream is re-zeroed after every residual add. So no value at a
visible position depends on anything at a masked position.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from timm.layers import trunc_normal_
from timm.layers.drop import drop_path as _timm_drop_path
from timm.models import register_model
from torch import nn

from .neuron import MultiStepLIF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# Masking helpers
# --------------------------------------------------------------------------------------------------


class VisibleMask:
    """A token-grid visibility mask [B, 1, h, w], expanded on demand to finer grids and to T*B rows."""

    def __init__(self, active: torch.Tensor, T: int) -> None:
        self.active = active
        self.T = T
        self._rows: dict[tuple[int, int], torch.Tensor] = {}

    def grid(self, height: int, width: int) -> torch.Tensor:
        """Bool [B, 1, height, width]: the token mask nearest-upsampled by an integer factor."""
        h, w = self.active.shape[-2:]
        if height % h or width % w:
            raise ValueError(f"cannot upsample a {h}x{w} token mask to {height}x{width}")
        return self.active.repeat_interleave(height // h, dim=2).repeat_interleave(width // w, dim=3)

    def rows(self, height: int, width: int) -> torch.Tensor:
        """Bool [T*B, 1, height, width], matching ``x.flatten(0, 1)`` of a [T, B, ...] tensor."""
        key = (height, width)
        if key not in self._rows:
            self._rows[key] = self.grid(height, width).repeat(self.T, 1, 1, 1)
        return self._rows[key]

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """Zero the masked positions of a [T*B, C, H, W] or token [T*B, C, N] tensor."""
        keep = self.token_rows() if y.dim() == 3 else self.rows(*y.shape[-2:])
        return y.masked_fill(~keep, 0.0)

    def apply_seq(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the masked positions of a [T, B, C, H, W] tensor."""
        return x.masked_fill(~self.grid(*x.shape[-2:]).unsqueeze(0), 0.0)

    def token_rows(self) -> torch.Tensor:
        """Bool [T*B, 1, N] for [T*B, C, N] token tensors."""
        h, w = self.active.shape[-2:]
        return self.rows(h, w).flatten(2)


def _rows(mask: VisibleMask | None, y: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask.rows(*y.shape[-2:])


def _zero_masked(mask: VisibleMask | None, y: torch.Tensor) -> torch.Tensor:
    return y if mask is None else mask.apply(y)


def _seq(lif: nn.Module, y: torch.Tensor, T: int) -> torch.Tensor:
    """Apply a neuron to [T*B, ...] rows: it needs time as its own leading dimension [T, B, ...]."""
    return lif(y.reshape(T, -1, *y.shape[1:])).flatten(0, 1)


def _fire(lif: nn.Module, y: torch.Tensor, T: int, mask: VisibleMask | None) -> torch.Tensor:
    """LIF over [T*B, ...] rows (reshaped to [T, B, ...] for the neuron), masked positions re-zeroed.

    LIF(0) is already 0 for a positive threshold; re-zeroing keeps the no-leak guarantee for any
    neuron setting.
    """
    return _zero_masked(mask, _seq(lif, y, T))


class _VisibleStatsMixin:
    """BatchNorm over visible positions only; keeps the parent's parameters, buffers and names."""

    def forward(self, x: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        if active is None:
            return super().forward(x)
        keep = active.expand(x.shape[0], 1, *x.shape[2:])
        if not self.training and self.track_running_stats:
            # running statistics: normalising everything, then zeroing, equals the visible-only path
            return super().forward(x).masked_fill(~keep, 0.0)
        channels = x.shape[1]
        keep = keep.movedim(1, -1).squeeze(-1)  # [N, *S]
        x_last = x.movedim(1, -1)  # [N, *S, C]
        visible = x_last[keep]  # [n_visible, C]
        trailing = (1,) * (x.dim() - 2)  # the parent checks the input rank
        normed = super().forward(visible.reshape(-1, channels, *trailing)).reshape(-1, channels)
        out = torch.zeros_like(x_last).index_put((keep,), normed)
        return out.movedim(-1, 1)


class MaskedBatchNorm1d(_VisibleStatsMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose ``forward(x, active)`` uses only visible positions ([N, 1, L] bool)."""


class MaskedBatchNorm2d(_VisibleStatsMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose ``forward(x, active)`` uses only visible positions ([N, 1, H, W] bool)."""


class TimeDropPath(nn.Module):
    """Stochastic depth per sample for [T, B, ...] tensors (timm's drop_path drops along dim 0)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        return _timm_drop_path(x.transpose(0, 1), self.drop_prob, self.training).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


# --------------------------------------------------------------------------------------------------
# Stems
# --------------------------------------------------------------------------------------------------


class SpikingConvUnit(nn.Module):
    """Residual Conv3x3 -> BN -> LIF at constant width: the SCS's supplementary layer."""

    def __init__(self, dim: int, residual: bool = True, lif_kwargs: dict | None = None) -> None:
        super().__init__()
        self.residual = residual
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = MaskedBatchNorm2d(dim)
        self.lif = MultiStepLIF(**(lif_kwargs or {}))

    def forward(self, y: torch.Tensor, T: int, mask: VisibleMask | None = None) -> torch.Tensor:
        out = _zero_masked(mask, self.conv(y))
        out = _fire(self.lif, self.bn(out, _rows(mask, out)), T, mask)
        return y + out if self.residual else out


class SPS(nn.Module):
    """Spikformer V1 Spiking Patch Splitting stem.

    Four stages Conv3x3(bias=False) -> BN -> LIF -> MaxPool(3, 2, 1) with widths D/8, D/4, D/2, D,
    then a relative-position Conv3x3 -> BN -> LIF whose output is added to its input. ``pools`` sets
    how many of the four stages down-sample (the last ones, as in the official CIFAR model): 4 gives
    stride 16 (224 px -> 14x14 tokens), 2 gives stride 4 (32 px -> 8x8 tokens).

    Input [T, B, C, H, W], output [T, B, D, H/stride, W/stride].
    """

    num_stages = 4

    def __init__(self, in_chans: int = 3, embed_dim: int = 512, pools: int = 4, lif_kwargs: dict | None = None) -> None:
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8 (stem widths D/8..D), got {embed_dim}")
        if not 0 <= pools <= self.num_stages:
            raise ValueError(f"pools must be in 0..{self.num_stages}, got {pools}")
        self.embed_dim = embed_dim
        self.widths = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        self.pooled = [k >= self.num_stages - pools for k in range(self.num_stages)]
        self.stride = 2**pools
        lif_kwargs = lif_kwargs or {}
        prev = in_chans
        for k, width in enumerate(self.widths):
            suffix = "" if k == 0 else str(k)
            setattr(self, f"proj_conv{suffix}", nn.Conv2d(prev, width, 3, 1, 1, bias=False))
            setattr(self, f"proj_bn{suffix}", MaskedBatchNorm2d(width))
            setattr(self, f"proj_lif{suffix}", MultiStepLIF(**lif_kwargs))
            if self.pooled[k]:
                setattr(self, f"maxpool{suffix}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            prev = width
        self.rpe_conv = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1, bias=False)
        self.rpe_bn = MaskedBatchNorm2d(embed_dim)
        self.rpe_lif = MultiStepLIF(**lif_kwargs)

    def _stage(self, k: int) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module | None]:
        suffix = "" if k == 0 else str(k)
        pool = getattr(self, f"maxpool{suffix}") if self.pooled[k] else None
        return (
            getattr(self, f"proj_conv{suffix}"),
            getattr(self, f"proj_bn{suffix}"),
            getattr(self, f"proj_lif{suffix}"),
            pool,
        )

    def extra_units(self, k: int) -> Sequence[SpikingConvUnit]:
        """Supplementary layers after stage k (none in V1)."""
        return ()

    def forward(self, x: torch.Tensor, mask: VisibleMask | None = None) -> torch.Tensor:
        T = x.shape[0]
        y = _zero_masked(mask, x.flatten(0, 1))
        for k in range(self.num_stages):
            conv, bn, lif, pool = self._stage(k)
            y = _zero_masked(mask, conv(y))
            y = _fire(lif, bn(y, _rows(mask, y)), T, mask)
            if pool is not None:
                y = _zero_masked(mask, pool(y))
            for unit in self.extra_units(k):
                y = unit(y, T, mask)
        feat = y
        y = _zero_masked(mask, self.rpe_conv(y))
        y = _fire(self.rpe_lif, self.rpe_bn(y, _rows(mask, y)), T, mask) + feat
        return y.reshape(T, -1, *y.shape[1:])


class SCS(SPS):
    """Spikformer V2 Spiking Convolutional Stem: the SPS plus supplementary Conv3x3-BN-LIF layers.

    The V2 paper's layer list is not public; its parameter counts are (8 layers, width 512) 51.55M and
    (16 layers, width 768) 172M. V1 blocks plus the V1 stem give 29.69M and 123.11M, so the stem must
    add about 83 * D^2 parameters. Our layout (``extra_convs``, default ``(0, 0, 1, 9)``, the number
    of supplementary layers after each stage's pooling):

    * 1 layer at width D/2 on the stride-8 grid (28x28 at 224 px): 9 * (D/2)^2 = 2.25 D^2
    * 9 layers at width D on the token grid (14x14), before the RPE: 9 * 9 * D^2 = 81 D^2

    i.e. 83.25 D^2 + BN (2 per channel): 8-512 -> 29.689 + 21.833 = 51.52M (paper 51.55M, -0.05%);
    16-768 -> 123.109 + 49.117 = 172.23M (paper 172M, +0.13%). The wide layers sit at the coarsest
    grid where a 3x3 conv is cheapest. Each layer is residual (x + LIF(BN(conv(x))), the SEW-style
    ADD used by the blocks and the RPE) so the 15-conv-deep stem keeps an identity path for the
    surrogate gradients; ``residual=False`` gives a plain stack. Cost: at 224 px the layers add
    4.62 GMACs per image and time step to the 8-512 model (8.36 -> 12.98 GMACs).
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 512,
        pools: int = 4,
        extra_convs: Sequence[int] = (0, 0, 1, 9),
        residual: bool = True,
        lif_kwargs: dict | None = None,
    ) -> None:
        super().__init__(in_chans, embed_dim, pools, lif_kwargs)
        if len(extra_convs) != self.num_stages or min(extra_convs) < 0:
            raise ValueError(f"extra_convs needs {self.num_stages} counts >= 0, got {tuple(extra_convs)}")
        self.extra_convs = tuple(extra_convs)
        for k, count in enumerate(self.extra_convs):
            if count:
                units = [SpikingConvUnit(self.widths[k], residual, lif_kwargs) for _ in range(count)]
                setattr(self, f"extra{k}", nn.ModuleList(units))

    def extra_units(self, k: int) -> Sequence[SpikingConvUnit]:
        return getattr(self, f"extra{k}", ()) if self.extra_convs[k] else ()


# --------------------------------------------------------------------------------------------------
# Encoder blocks
# --------------------------------------------------------------------------------------------------


class SSA(nn.Module):
    """Spiking Self-Attention: Q, K, V spikes, out = LIF_{0.5}(Q (K^T V) * scale), no softmax.

    K^T V is computed first ([d, d] per head: O(N d^2)); no N x N tensor and no loop over heads.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        scale: float = 0.125,
        attn_v_threshold: float = 0.5,
        lif_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        lif_kwargs = lif_kwargs or {}
        self.dim = dim
        self.num_heads = num_heads
        self.scale = scale
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_conv", nn.Conv1d(dim, dim, kernel_size=1, stride=1, bias=False))
            setattr(self, f"{name}_bn", MaskedBatchNorm1d(dim))
            setattr(self, f"{name}_lif", MultiStepLIF(**lif_kwargs))
        self.attn_lif = MultiStepLIF(**{**lif_kwargs, "v_threshold": attn_v_threshold})
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1, stride=1)
        self.proj_bn = MaskedBatchNorm1d(dim)
        self.proj_lif = MultiStepLIF(**lif_kwargs)

    def attention_flops(self, num_tokens: int) -> tuple[int, int]:
        """Multiply-accumulates of (K^T V, Q (K^T V)) per image and time step."""
        head_dim = self.dim // self.num_heads
        flops = num_tokens * head_dim * self.dim  # heads * (d x N @ N x d)
        return flops, flops

    def _spikes(self, name: str, x: torch.Tensor, T: int, mask: VisibleMask | None) -> torch.Tensor:
        y = _zero_masked(mask, getattr(self, f"{name}_conv")(x))
        keep = None if mask is None else mask.token_rows()
        return _fire(getattr(self, f"{name}_lif"), getattr(self, f"{name}_bn")(y, keep), T, mask)

    def forward(self, x: torch.Tensor, mask: VisibleMask | None = None) -> torch.Tensor:
        T, B, C, H, W = x.shape
        N = H * W
        rows = x.flatten(3).flatten(0, 1)  # [T*B, C, N]
        heads = (T, B, self.num_heads, C // self.num_heads, N)
        q = self._spikes("q", rows, T, mask).reshape(heads)
        k = self._spikes("k", rows, T, mask).reshape(heads)
        v = self._spikes("v", rows, T, mask).reshape(heads)
        kv = k @ v.transpose(-1, -2)  # [T, B, h, d, d] = (K^T V) per head
        out = (kv.transpose(-1, -2) @ q) * self.scale  # [T, B, h, d, N] = (Q K^T V)^T
        out = _fire(self.attn_lif, out.reshape(T * B, C, N), T, mask)
        out = _zero_masked(mask, self.proj_conv(out))
        keep = None if mask is None else mask.token_rows()
        out = _fire(self.proj_lif, self.proj_bn(out, keep), T, mask)
        return out.reshape(T, B, C, H, W)


class MLP(nn.Module):
    """1x1 conv D -> hidden -> D, each followed by BN and LIF."""

    def __init__(self, dim: int, hidden: int, lif_kwargs: dict | None = None) -> None:
        super().__init__()
        lif_kwargs = lif_kwargs or {}
        self.fc1_conv = nn.Conv2d(dim, hidden, kernel_size=1, stride=1)
        self.fc1_bn = MaskedBatchNorm2d(hidden)
        self.fc1_lif = MultiStepLIF(**lif_kwargs)
        self.fc2_conv = nn.Conv2d(hidden, dim, kernel_size=1, stride=1)
        self.fc2_bn = MaskedBatchNorm2d(dim)
        self.fc2_lif = MultiStepLIF(**lif_kwargs)

    def forward(self, x: torch.Tensor, mask: VisibleMask | None = None) -> torch.Tensor:
        T = x.shape[0]
        y = _zero_masked(mask, self.fc1_conv(x.flatten(0, 1)))
        y = _fire(self.fc1_lif, self.fc1_bn(y, _rows(mask, y)), T, mask)
        y = _zero_masked(mask, self.fc2_conv(y))
        y = _fire(self.fc2_lif, self.fc2_bn(y, _rows(mask, y)), T, mask)
        return y.reshape(x.shape)


class Block(nn.Module):
    """x = x + SSA(x); x = x + MLP(x) (SEW-style ADD), with stochastic depth on both branches."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attn_scale: float = 0.125,
        attn_v_threshold: float = 0.5,
        lif_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.attn = SSA(dim, num_heads, attn_scale, attn_v_threshold, lif_kwargs)
        self.mlp = MLP(dim, int(dim * mlp_ratio), lif_kwargs)
        self.drop_path = TimeDropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: VisibleMask | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x, mask))
        if mask is not None:
            x = mask.apply_seq(x)
        x = x + self.drop_path(self.mlp(x, mask))
        if mask is not None:
            x = mask.apply_seq(x)
        return x


# --------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------


class Spikformer(nn.Module):
    """Spikformer classifier (V1 with ``stem="sps"``, V2 with ``stem="scs"``).

    Args:
        img_size: default input size (square); only used for ``grid_size()`` and ``pretrained_cfg``,
            the network itself accepts any size divisible by ``patch_stride``.
        in_chans, num_classes: input channels, classes (0 -> no head, ``forward`` returns features).
        embed_dim, depth, num_heads, mlp_ratio: encoder width, blocks, heads, MLP hidden ratio.
        T: time steps (direct encoding: the image is repeated T times); may be changed on the model.
        drop_path_rate: stochastic depth, linearly increasing from 0 to this over the blocks.
        attn_scale, attn_v_threshold: SSA scale (0.125) and threshold of the neuron after Q K^T V (0.5).
        stem: "sps" (V1) or "scs" (V2); stem_pools: number of down-sampling stages (stride 2**pools).
        scs_extra_convs, scs_residual: SCS supplementary layer layout (see ``SCS``).
        lif_kwargs: extra ``MultiStepLIF`` arguments for every neuron (tau, alpha, backend, ...).
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        T: int = 4,
        drop_path_rate: float = 0.0,
        attn_scale: float = 0.125,
        attn_v_threshold: float = 0.5,
        stem: str = "sps",
        stem_pools: int = 4,
        scs_extra_convs: Sequence[int] = (0, 0, 1, 9),
        scs_residual: bool = True,
        lif_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.T = T
        self.stem_type = stem
        if stem == "sps":
            self.patch_embed = SPS(in_chans, embed_dim, stem_pools, lif_kwargs)
        elif stem == "scs":
            self.patch_embed = SCS(in_chans, embed_dim, stem_pools, scs_extra_convs, scs_residual, lif_kwargs)
        else:
            raise ValueError(f"stem must be 'sps' or 'scs', got {stem!r}")
        self.patch_stride = self.patch_embed.stride
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.block = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rate, attn_scale, attn_v_threshold, lif_kwargs) for rate in rates
        )
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (in_chans, img_size, img_size),
            "num_classes": num_classes,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "first_conv": "patch_embed.proj_conv",
            "classifier": "head",
        }

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- geometry ---------------------------------------------------------------------------------

    def grid_size(self, img_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Token grid (h, w) for an input size (default: ``self.img_size``); MaxPool(3,2,1) rounds up."""
        size = self.img_size if img_size is None else img_size
        h, w = (size, size) if isinstance(size, int) else size
        for _ in range(int(math.log2(self.patch_stride))):
            h, w = -(-h // 2), -(-w // 2)
        return h, w

    # --- forward ----------------------------------------------------------------------------------

    def _encode_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return x.unsqueeze(0).expand(self.T, *x.shape)
        if x.dim() == 5:
            return x
        raise ValueError(f"expected images [B, C, H, W] or [T, B, C, H, W], got shape {tuple(x.shape)}")

    def _check_active(self, active: torch.Tensor, x: torch.Tensor) -> None:
        batch, height, width = x.shape[1], x.shape[-2], x.shape[-1]
        if height % self.patch_stride or width % self.patch_stride:
            raise ValueError(f"masked input {height}x{width} must be divisible by the stride {self.patch_stride}")
        grid = (height // self.patch_stride, width // self.patch_stride)
        if active.dtype != torch.bool or tuple(active.shape) != (batch, 1, *grid):
            raise ValueError(
                f"active must be a bool tensor of shape {(batch, 1, *grid)}, got {active.dtype} {tuple(active.shape)}"
            )

    def forward_tokens(self, x: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output before pooling, [T, B, D, h, w].

        ``x``: images [B, C, H, W] (repeated ``self.T`` times) or a spike/frame sequence [T, B, C, H, W].
        ``active``: optional bool [B, 1, h, w] on the token grid (True = visible). When given, every
        output at a visible position is independent of the input at masked positions, and masked
        positions of the output are zero.
        """
        x = self._encode_input(x)
        mask = None
        if active is not None:
            self._check_active(active, x)
            mask = VisibleMask(active, x.shape[0])
        x = self.patch_embed(x, mask)
        if mask is not None:
            x = mask.apply_seq(x)
        for blk in self.block:
            x = blk(x, mask)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, D]: mean over tokens, then over time steps."""
        return self.forward_tokens(x).mean(dim=(3, 4)).mean(dim=0)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- timm conventions -------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Stem = layer 0, block i = layer i + 1, head = layer depth + 1 (for layer-wise lr decay)."""
        return {"stem": r"^patch_embed", "blocks": r"^block\.(\d+)"}  # head: unmatched -> last

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # no tokens/embeddings; timm already skips biases and BN (1-D) parameters

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        device = next(self.parameters()).device
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=device)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()


# --------------------------------------------------------------------------------------------------
# Registered variants
# --------------------------------------------------------------------------------------------------

# name -> (constructor arguments, paper parameter count in M or None). Heads = D / 64 as in V1
# (8-512 uses 8 heads in the official code).
VARIANTS: dict[str, tuple[dict, float | None]] = {
    "spikformer_v1_8_384": ({"depth": 8, "embed_dim": 384, "num_heads": 6, "stem": "sps"}, 16.81),
    "spikformer_v1_6_512": ({"depth": 6, "embed_dim": 512, "num_heads": 8, "stem": "sps"}, 23.37),
    "spikformer_v1_8_512": ({"depth": 8, "embed_dim": 512, "num_heads": 8, "stem": "sps"}, 29.68),
    "spikformer_v1_10_512": ({"depth": 10, "embed_dim": 512, "num_heads": 8, "stem": "sps"}, 36.01),
    "spikformer_v1_8_768": ({"depth": 8, "embed_dim": 768, "num_heads": 12, "stem": "sps"}, 66.34),
    "spikformer_v2_8_384": ({"depth": 8, "embed_dim": 384, "num_heads": 6, "stem": "scs"}, None),
    "spikformer_v2_8_512": ({"depth": 8, "embed_dim": 512, "num_heads": 8, "stem": "scs"}, 51.55),
    "spikformer_v2_8_768": ({"depth": 8, "embed_dim": 768, "num_heads": 12, "stem": "scs"}, None),
    "spikformer_v2_16_768": ({"depth": 16, "embed_dim": 768, "num_heads": 12, "stem": "scs", "T": 1}, 172.0),
    # 32 px, 10 classes, stride 4 -> 8x8 tokens, head dim 16: trains on 2 CPU cores in minutes.
    "spikformer_v2_tiny": (
        {
            "depth": 2,
            "embed_dim": 64,
            "num_heads": 4,
            "stem": "scs",
            "stem_pools": 2,
            "T": 1,
            "img_size": 32,
            "num_classes": 10,
            "scs_extra_convs": (0, 0, 0, 1),
        },
        None,
    ),
}


def _build(name: str, pretrained: bool, kwargs: dict) -> Spikformer:
    if pretrained:
        raise ValueError(
            f"{name}: no downloadable weights; build with pretrained=False and load a checkpoint "
            "(models.load_spikformer_v1_checkpoint for official V1 weights)"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # passed by timm.create_model
        kwargs.pop(key, None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = Spikformer(**{**VARIANTS[name][0], **kwargs})
    return model if dtype is None else model.to(dtype)


@register_model
def spikformer_v1_8_384(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v1_8_384", pretrained, kwargs)


@register_model
def spikformer_v1_6_512(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v1_6_512", pretrained, kwargs)


@register_model
def spikformer_v1_8_512(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v1_8_512", pretrained, kwargs)


@register_model
def spikformer_v1_10_512(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v1_10_512", pretrained, kwargs)


@register_model
def spikformer_v1_8_768(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v1_8_768", pretrained, kwargs)


@register_model
def spikformer_v2_8_384(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v2_8_384", pretrained, kwargs)


@register_model
def spikformer_v2_8_512(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v2_8_512", pretrained, kwargs)


@register_model
def spikformer_v2_8_768(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v2_8_768", pretrained, kwargs)


@register_model
def spikformer_v2_16_768(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v2_16_768", pretrained, kwargs)


@register_model
def spikformer_v2_tiny(pretrained: bool = False, **kwargs) -> Spikformer:
    return _build("spikformer_v2_tiny", pretrained, kwargs)


def list_models() -> list[str]:
    """Names of the registered Spikformer variants."""
    return list(VARIANTS)


def create(name: str, **kwargs) -> Spikformer:
    """Build a registered variant by name (same as ``timm.create_model(name, **kwargs)``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown Spikformer variant {name!r}; known: {list_models()}")
    return _build(name, False, kwargs)
