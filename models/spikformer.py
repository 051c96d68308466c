"""Spikformer V1 and V2: spiking stems (SPS, SCS), Spiking Self-Attention, and the classifier.

Layout: spiking tensors are ``[T, B, C, H, W]`` (or ``[T, B, C, N]`` inside attention); T is a real
dimension only inside the LIF neurons, convolutions and BatchNorms see ``T * B`` rows. The image is
repeated T times (direct encoding); logits = head(mean over T of the mean over tokens).

Module and parameter names follow the official V1 ImageNet code (ZK-Zhou/spikformer,
imagenet/model.py: ``patch_embed.proj_conv``, ``block.0.attn.q_conv``, ``block.0.mlp.fc1_conv``,
``head``) so that V1 checkpoints load by name (see ``models.v1_weights``). The official blocks also
build two LayerNorms they never call; we do not build them (the loader ignores their keys).

Masking hook for masked-image modelling (SparK style): ``forward_tokens(x, active)`` with ``active``
a bool tensor [B, 1, h, w] on the token grid (True = visible). Masked pixels are zeroed, the mask is
re-applied after every conv, BatchNorm and pooling, BatchNorms use visible positions only for their
batch statistics (masked sums: static shapes, no host sync; ``forward_indexed`` keeps the original
boolean-indexing version as the reference), and the token stream is re-zeroed after every residual
add. So no value at a visible position depends on anything at a masked position.

MIM's fast path, ``forward_visible(x, active, index)``: the same masked stem up to the token grid,
then the token-grid layers at the visible positions only and the blocks on the gathered visible
tokens (``VisibleTokens``): the same values at those tokens, at the cost of the visible ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_model
from torch import nn

from .neuron import NEURONS, MultiStepLIF, replace_neurons

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# Masking helpers
# --------------------------------------------------------------------------------------------------


def _upsample_nearest(active: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bool [B, 1, h, w] -> [B, 1, height, width] by an integer factor (expand + reshape: static shapes)."""
    B, _, h, w = active.shape
    if height % h or width % w:
        raise ValueError(f"cannot upsample a {h}x{w} token mask to {height}x{width}")
    fh, fw = height // h, width // w
    return active[:, :, :, None, :, None].expand(B, 1, h, fh, w, fw).reshape(B, 1, height, width)


class VisibleMask:
    """A token-grid visibility mask [B, 1, h, w], expanded on demand to finer grids and to T*B rows.

    ``indexed_bn=True`` makes the BatchNorms of this forward use ``forward_indexed`` (boolean
    indexing, the original implementation kept as the oracle) instead of masked sums.
    """

    def __init__(self, active: torch.Tensor, T: int, indexed_bn: bool = False) -> None:
        self.active = active
        self.T = T
        self.indexed_bn = indexed_bn
        self._rows: dict[tuple[int, int], torch.Tensor] = {}
        self._weights: dict[tuple, torch.Tensor] = {}

    def grid(self, height: int, width: int) -> torch.Tensor:
        """Bool [B, 1, height, width]: the token mask nearest-upsampled by an integer factor."""
        return _upsample_nearest(self.active, height, width)

    def rows(self, height: int, width: int) -> torch.Tensor:
        """Bool [T*B, 1, height, width], matching ``x.flatten(0, 1)`` of a [T, B, ...] tensor."""
        key = (height, width)
        if key not in self._rows:
            self._rows[key] = self.grid(height, width).repeat(self.T, 1, 1, 1)
        return self._rows[key]

    def keep(self, y: torch.Tensor) -> torch.Tensor:
        """The bool keep-mask broadcastable to a [T*B, C, H, W] or token [T*B, C, N] tensor."""
        return self.token_rows() if y.dim() == 3 else self.rows(*y.shape[-2:])

    def weights(self, y: torch.Tensor) -> torch.Tensor:
        """``keep(y)`` as 0/1 in y's dtype (cached): multiplying by it is several times faster on CPU
        than ``masked_fill`` with a broadcast bool mask."""
        key = (y.dim(), *y.shape[-2:], y.dtype)
        if key not in self._weights:
            self._weights[key] = self.keep(y).to(y.dtype)
        return self._weights[key]

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """Zero the masked positions of a [T*B, C, H, W] or token [T*B, C, N] tensor (finite values)."""
        return y * self.weights(y)

    def apply_(self, y: torch.Tensor) -> torch.Tensor:
        """``apply`` in place, for a fresh intermediate (a conv, pool or LIF output nothing else holds):
        on CPU the allocation (page faults) of a new full-size tensor costs more than the multiply."""
        return y.mul_(self.weights(y))

    def apply_seq(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the masked positions of a [T, B, C, H, W] tensor."""
        return x * self.grid(*x.shape[-2:]).unsqueeze(0).to(x.dtype)

    def token_rows(self) -> torch.Tensor:
        """Bool [T*B, 1, N] for [T*B, C, N] token tensors."""
        h, w = self.active.shape[-2:]
        return self.rows(h, w).flatten(2)


class VisibleTokens:
    """The visible tokens of a masked batch as an index: the encoder's fast path for MIM.

    ``index`` [B, n] (int64) lists, per sample, n positions of the row-major h x w token grid, all of
    them visible; every sample has the same n (MIM masks exactly round(L * ratio) patches), so every
    shape below is static. Tokens are carried as [T*B, C, n] in the order of ``index``.
    """

    def __init__(self, index: torch.Tensor, grid: tuple[int, int], T: int) -> None:
        if index.dim() != 2 or index.dtype != torch.int64:
            raise ValueError(f"index must be an int64 tensor [B, n], got {index.dtype} {tuple(index.shape)}")
        self.index = index
        self.grid = (int(grid[0]), int(grid[1]))
        self.T = T
        self._rows = index.repeat(T, 1).unsqueeze(1)  # [T*B, 1, n]
        self._neighbour_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}

    @property
    def count(self) -> int:
        return self.index.shape[1]

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """[T*B, C, h, w] grid -> [T*B, C, n] visible tokens."""
        flat = y.flatten(2)
        return flat.gather(2, self._rows.expand(-1, flat.shape[1], -1))

    def scatter(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T*B, C, n] visible tokens -> [T*B, C, h, w] grid, zeros at every other position."""
        rows, channels, _ = tokens.shape
        grid = tokens.new_zeros(rows, channels, self.grid[0] * self.grid[1])
        return grid.scatter(2, self._rows.expand(-1, channels, -1), tokens).view(rows, channels, *self.grid)

    def _neighbours(self, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(visible positions [T*B, 1, n], their k x k neighbourhoods [T*B, 1, k*k*n] ordered (ky, kx, n)),
        both as positions in the zero-padded grid, and the padded grid's size."""
        (h, w), (kh, kw), (dh, dw), (ph, pw) = self.grid, conv.kernel_size, conv.dilation, conv.padding
        if conv.groups != 1 or conv.stride != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError(f"visible-position convolution needs groups=1, stride 1, zero padding; got {conv}")
        if 2 * ph != dh * (kh - 1) or 2 * pw != dw * (kw - 1):
            raise ValueError(f"{conv} does not preserve the {h}x{w} token grid")
        width = w + 2 * pw
        rows, cols = self.index // w + ph, self.index % w + pw  # [B, n] in the padded grid
        dy = torch.arange(kh, device=rows.device) * dh - ph
        dx = torch.arange(kw, device=rows.device) * dw - pw
        around_rows = rows[:, None, None, :] + dy[None, :, None, None]  # [B, kh, 1, n]
        around = around_rows * width + cols[:, None, None, :] + dx[None, None, :, None]  # [B, kh, kw, n]
        centre = (rows * width + cols).repeat(self.T, 1).unsqueeze(1)
        return centre, around.flatten(1).repeat(self.T, 1).unsqueeze(1), (h + 2 * ph) * width

    def conv(self, conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        """``conv`` of the zero-filled grid, evaluated at the visible output positions only.

        Exact (up to summation order): the visible tokens go into a zero-padded grid, each output
        position gathers its k x k neighbourhood (im2col at n positions only), one batched GEMM.
        Costs n / (h * w) of the dense conv's multiply-accumulates.
        """
        key = (conv.kernel_size, conv.dilation, conv.padding)
        if key not in self._neighbour_cache:
            self._neighbour_cache[key] = self._neighbours(conv)
        centre, around, size = self._neighbour_cache[key]
        rows, channels, n = tokens.shape
        padded = tokens.new_zeros(rows, channels, size).scatter(2, centre.expand(-1, channels, -1), tokens)
        cols = padded.gather(2, around.expand(-1, channels, -1)).view(rows, -1, n)  # [T*B, C*k*k, n]
        out = torch.matmul(conv.weight.flatten(1), cols)  # [T*B, C_out, n]
        return out if conv.bias is None else out + conv.bias[:, None]


def _zero_masked(mask: VisibleMask | None, y: torch.Tensor) -> torch.Tensor:
    return y if mask is None else mask.apply(y)


def _zero_masked_(mask: VisibleMask | None, y: torch.Tensor) -> torch.Tensor:
    """``_zero_masked`` in place: only for a fresh op output."""
    return y if mask is None else mask.apply_(y)


def _norm(bn: nn.Module, y: torch.Tensor, mask: VisibleMask | None) -> torch.Tensor:
    """BatchNorm with visible-only statistics under a mask (masked sums, or the indexed oracle)."""
    if mask is None:
        return bn(y)
    keep = mask.keep(y)
    return bn.forward_indexed(y, keep) if mask.indexed_bn else bn(y, keep)


def _norm_tokens(bn: nn.BatchNorm2d, tokens: torch.Tensor) -> torch.Tensor:
    """A plain BatchNorm2d over [T*B, C, n] gathered tokens (statistics = visible-only statistics)."""
    return bn(tokens.unsqueeze(2)).squeeze(2)


def _seq(lif: nn.Module, y: torch.Tensor, T: int) -> torch.Tensor:
    """Apply a neuron to [T*B, ...] rows: it needs time as its own leading dimension [T, B, ...]."""
    return lif(y.reshape(T, -1, *y.shape[1:])).flatten(0, 1)


def _fire(lif: nn.Module, y: torch.Tensor, T: int, mask: VisibleMask | None) -> torch.Tensor:
    """LIF over [T*B, ...] rows (reshaped to [T, B, ...] for the neuron), masked positions re-zeroed.

    LIF(0) is already 0 for a positive threshold; re-zeroing keeps the no-leak guarantee for any
    neuron setting.
    """
    return _zero_masked_(mask, _seq(lif, y, T))


class _MaskedNormalize(torch.autograd.Function):
    """BatchNorm's normalisation with given masked batch statistics, zeroed where the 0/1 mask m is 0.

    Forward: ``F.batch_norm`` with (mean, var) as fixed statistics, times m. Backward: BatchNorm's
    batch-statistics gradient over the n positions where m = 1,
    dx = m * a * (g - sum(g) / n - (x - mean) * invstd^2 * sum(g (x - mean)) / n), g = m dy,
    a = invstd * weight; both sums come from one pass of PyTorch's fused BatchNorm backward kernel.
    """

    @staticmethod
    def forward(ctx, x, m, mean, var, weight, bias, count, eps):
        stats = mean.dtype  # float32 at least; weight and bias follow it (a bf16 input is fine)
        weight = torch.ones_like(mean) if weight is None else weight.to(stats)
        bias_used = bias is not None
        bias = None if bias is None else bias.to(stats)
        out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        # in place saves an allocation in eager mode; traced, torch 2.11's AOTAutograd gives every input
        # of a Function whose forward mutates its output a zero gradient (2.14 does not): out of place there
        out = out * m.to(x.dtype) if torch.compiler.is_compiling() else out.mul_(m.to(x.dtype))
        ctx.save_for_backward(x, m, mean, torch.rsqrt(var + eps), weight, count)
        ctx.eps, ctx.bias_used = eps, bias_used
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, m, mean, invstd, weight, count = ctx.saved_tensors
        shape = (1, -1, *(1,) * (x.dim() - 2))
        g = grad_out * m.to(grad_out.dtype)
        # sums only: sum(g (x - mean) invstd) -> "grad_weight", sum(g) -> "grad_bias"
        _, dot, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        alpha = invstd * weight
        k = alpha * invstd * dot / count  # per channel: a * invstd^2 * sum(g (x - mean)) / n
        offset = k * mean - alpha * sum_g / count
        # dx = m (a g - k x + offset), in the statistics' dtype (float32 for bf16 inputs), in place on
        # our own temporaries: on CPU a fresh full-size tensor costs more than the arithmetic
        work = mean.dtype
        grad_x = g.to(work).mul_(alpha.view(shape))
        grad_x.addcmul_(x.to(work), (-k).view(shape)).add_(offset.view(shape)).mul_(m)
        return grad_x.to(x.dtype), None, None, None, dot, sum_g if ctx.bias_used else None, None, None


def masked_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``bn`` over the positions where ``keep`` is True; zeros elsewhere. Static shapes, no host sync.

    Batch statistics are masked sums over the batch and spatial dims (in float32 at least):
    mean = sum(m x) / n, biased var = sum(m (x - mean)^2) / n, the same two-pass estimate
    ``nn.BatchNorm`` uses; running statistics move exactly as there (momentum, or the cumulative
    average when momentum is None; unbiased variance n / (n - 1)); eval mode uses them.
    """
    keep = keep.expand(x.shape[0], 1, *x.shape[2:])
    if not (bn.training or not bn.track_running_stats):
        # running statistics: normalising everything, then zeroing, equals the visible-only path
        out = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return out * keep.to(out.dtype)
    dtype = torch.promote_types(x.dtype, torch.float32)
    dims = [0, *range(2, x.dim())]
    shape = (1, -1, *(1,) * (x.dim() - 2))
    m = keep.to(dtype)
    with torch.no_grad():
        count = m.sum(dims)  # [1]: the same number of visible positions for every channel
        mean = (x.detach() * m).sum(dims, dtype=dtype) / count
        var = (x.detach() - mean.view(shape)).mul_(m).square_().sum(dims) / count  # one temporary
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            # the parent's update: running = (1 - f) * running + f * batch statistic
            factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(dtype)
            unbiased = var * count / (count - 1)
            for buffer, value in ((bn.running_mean, mean), (bn.running_var, unbiased)):
                buffer.copy_(buffer.to(dtype) * (1.0 - factor) + value * factor)
    return _MaskedNormalize.apply(x, m, mean, var, bn.weight, bn.bias, count, bn.eps)


class _VisibleStatsMixin:
    """BatchNorm over visible positions only; keeps the parent's parameters, buffers and names.

    ``forward(x, active)`` uses ``masked_batch_norm`` (masked sums); ``forward_indexed`` is the
    original boolean-indexing implementation (compact the visible positions, run the parent, scatter
    back), kept as the reference: it has a data-dependent shape (a host sync on CUDA, a graph break
    under torch.compile).
    """

    def forward(self, x: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        if active is None:
            return super().forward(x)
        return masked_batch_norm(self, x, active)

    def forward_indexed(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        keep = active.expand(x.shape[0], 1, *x.shape[2:])
        if not self.training and self.track_running_stats:
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
    """Stochastic depth per sample for [T, B, ...] tensors: in training each sample's branch is zeroed with
    probability ``drop_prob`` and the others are scaled by 1 / (1 - drop_prob) (timm's drop_path, along B).

    The rate lives in a tensor (a non-persistent float32 buffer), not in a Python float: torch.compile
    specialises on Python attributes, so blocks with different stochastic-depth rates would each need
    their own compiled copy of any frame that resumes inside a block (torch 2.11 hit its recompile limit
    that way); a tensor's value is no guard. The one Python switch is ``enabled`` (default
    ``drop_prob > 0``); a model passes the same value to all its blocks, so it guards alike everywhere.
    """

    def __init__(self, drop_prob: float = 0.0, enabled: bool | None = None) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.enabled = drop_prob > 0.0 if enabled is None else bool(enabled)
        self.register_buffer("rate", torch.tensor(self.drop_prob, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # .bfloat16() / .half() (DeepSpeed's bf16 engine) would round the rate: keep it float32, on the new device
        super()._apply(fn, recurse)
        self.rate = torch.tensor(self.drop_prob, dtype=torch.float32, device=self.rate.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.enabled and self.training):
            return x
        keep = 1.0 - self.rate
        draw = torch.rand((1, x.shape[1], *(1,) * (x.dim() - 2)), device=x.device) < keep  # per sample
        return x * (draw.to(keep.dtype) / keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, enabled={self.enabled}"


# --------------------------------------------------------------------------------------------------
# Stems
# --------------------------------------------------------------------------------------------------


class VisibleConv2d(nn.Conv2d):
    """``nn.Conv2d`` that can also run at the visible token positions only.

    ``forward(x)`` is the plain conv; ``forward(tokens, visible)`` takes visible tokens [T*B, C, n]
    (zeros everywhere else on the grid) and returns the conv's output at those positions,
    [T*B, C_out, n] (``VisibleTokens.conv``). Going through ``__call__`` keeps forward hooks (FLOP
    counts, energy probes) seeing the work actually done.
    """

    def forward(self, x: torch.Tensor, visible: VisibleTokens | None = None) -> torch.Tensor:
        return super().forward(x) if visible is None else visible.conv(self, x)


class SpikingConvUnit(nn.Module):
    """Residual Conv3x3 -> BN -> LIF at constant width: the SCS's supplementary layer."""

    def __init__(self, dim: int, residual: bool = True, lif_kwargs: dict | None = None) -> None:
        super().__init__()
        self.residual = residual
        self.conv = VisibleConv2d(dim, dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = MaskedBatchNorm2d(dim)
        self.lif = MultiStepLIF(**(lif_kwargs or {}))

    def forward(self, y: torch.Tensor, T: int, mask: VisibleMask | None = None) -> torch.Tensor:
        out = _zero_masked_(mask, self.conv(y))
        out = _fire(self.lif, _norm(self.bn, out, mask), T, mask)
        return y + out if self.residual else out

    def forward_visible(self, tokens: torch.Tensor, T: int, visible: VisibleTokens) -> torch.Tensor:
        """The same layer on visible tokens [T*B, C, n] of the token grid (masked positions are zero)."""
        out = _seq(self.lif, _norm_tokens(self.bn, self.conv(tokens, visible)), T)
        return tokens + out if self.residual else out


class SPS(nn.Module):
    """Spikformer V1 Spiking Patch Splitting stem.

    Four stages Conv3x3(bias=False) -> BN -> LIF -> MaxPool(3, 2, 1) with widths D/8, D/4, D/2, D,
    then a relative-position Conv3x3 -> BN -> LIF whose output is added to its input. ``pools`` sets
    how many of the four stages down-sample (the last ones, as in the official CIFAR model): 4 gives
    stride 16 (224 px -> 14x14 tokens), 2 gives stride 4 (32 px -> 8x8 tokens).

    Input [T, B, C, H, W], output [T, B, D, H/stride, W/stride]. With ``visible`` (MIM's fast path,
    which also needs ``mask``) the layers on the token grid (the last stage's supplementary layers and
    the RPE) run at the visible positions only and the output is [T, B, D, n] visible tokens: the
    same values as the masked dense stem at those positions.
    """

    num_stages = 4
    LAYOUTS = ("auto", "channels_last", "contiguous")

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
        self.rpe_conv = VisibleConv2d(embed_dim, embed_dim, 3, 1, 1, bias=False)
        self.rpe_bn = MaskedBatchNorm2d(embed_dim)
        self.rpe_lif = MultiStepLIF(**lif_kwargs)
        self.layout = "auto"  # see channels_last()

    def channels_last(self, y: torch.Tensor) -> bool:
        """Whether the stem's image-grid activations run channels_last (NHWC), the layout cuDNN's
        convolutions use: "auto" on CUDA under torch.compile (the GPU's compiled step spent ~12% in
        NCHW<->NHWC transposes), never in eager mode, whose fused Triton LIF reads contiguous [T, ...]
        tensors. The tokens leave the stem contiguous for the blocks' 1x1 convs either way."""
        if self.layout == "auto":
            return y.is_cuda and torch.compiler.is_compiling()
        return self.layout == "channels_last"

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

    def forward(
        self, x: torch.Tensor, mask: VisibleMask | None = None, visible: VisibleTokens | None = None
    ) -> torch.Tensor:
        if visible is not None and mask is None:
            raise ValueError("the visible-token stem also needs the mask of its dense layers")
        T = x.shape[0]
        last = self.num_stages - 1
        y = _zero_masked(mask, x.flatten(0, 1))
        if self.channels_last(y):
            y = y.contiguous(memory_format=torch.channels_last)  # elementwise ops, BN and pools keep it
        for k in range(self.num_stages):
            conv, bn, lif, pool = self._stage(k)
            y = _zero_masked_(mask, conv(y))
            y = _fire(lif, _norm(bn, y, mask), T, mask)
            if pool is not None:
                y = _zero_masked_(mask, pool(y))
            if k == last and visible is not None:
                break  # the token grid: its layers run on visible tokens below
            for unit in self.extra_units(k):
                y = unit(y, T, mask)
        if visible is not None:
            tokens = visible.gather(y)  # [T*B, D, n]
            for unit in self.extra_units(last):
                tokens = unit.forward_visible(tokens, T, visible)
            rpe = _seq(self.rpe_lif, _norm_tokens(self.rpe_bn, self.rpe_conv(tokens, visible)), T)
            return (rpe + tokens).reshape(T, -1, *tokens.shape[1:])
        feat = y
        y = _zero_masked_(mask, self.rpe_conv(y))
        y = (_fire(self.rpe_lif, _norm(self.rpe_bn, y, mask), T, mask) + feat).contiguous()
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


def _no_autocast(device_type: str):
    """Autocast off for ``device_type`` where it is on. ``torch.is_autocast_enabled`` traces under every
    torch.compile we support; ``torch.amp.is_autocast_available`` does not on torch 2.11 (a graph break in
    every block). Meta tensors (FLOP counting) have no autocast state to ask about."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


BF16_EXACT_COUNT = 256  # every integer 0..256 is a bfloat16 (8 significant bits); 257 is not
PRODUCTS = ("auto", "bf16", "fp32")


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 [n, i, k] @ [n, k, j] with float32 accumulation and a float32 result.

    On a GPU one bf16 GEMM (tensor cores) writing float32 (``torch.bmm(..., out_dtype=)``, also what the
    meta device runs); the CPU has no such kernel, so there the bf16 operands are multiplied in float32:
    the same arithmetic, without the speed.
    """
    if a.device.type != "cpu":
        return torch.bmm(a, b, out_dtype=torch.float32)
    with _no_autocast("cpu"):
        return torch.bmm(a.float(), b.float())


class _SpikeProduct(torch.autograd.Function):
    """``_bmm_f32`` with autograd (the ``out_dtype`` overload has none): the gradients are bf16 GEMMs of
    the float32 upstream gradient rounded to bf16, the precision autocast gives every linear layer."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _bmm_f32(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        return torch.bmm(grad, b.transpose(1, 2)), torch.bmm(a.transpose(1, 2), grad)


def _spike_attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Both products as bf16 GEMMs with float32 accumulation and output: exact while N <= 256.

    Every bf16 operand holds an exact value: Q, K, V are 0/1, and K^T V holds counts <= N (exact in bf16
    for N <= 256). The second product sums d such counts (<= N d, far below 2^24) in float32, and its
    result stays float32. The other order, (Q K^T) V, would keep counts <= d but build N x N per head.
    """
    *lead, d, n = q.shape
    q, k, v = (t.to(torch.bfloat16).reshape(-1, d, n) for t in (q, k, v))
    kv = _SpikeProduct.apply(k, v.transpose(1, 2))  # [h, d, d] = K^T V, float32 counts <= N
    out = _SpikeProduct.apply(kv.transpose(1, 2).to(torch.bfloat16), q)  # [h, d, N] = (Q K^T V)^T
    return (out * scale).reshape(*lead, d, n)


def spike_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, products: str = "auto"
) -> torch.Tensor:
    """(Q K^T V)^T * scale per head for spike tensors q, k, v [..., d, N] (K^T V first: no N x N).

    Exact for spikes; the result is float32 (float64 for float64 input) whatever the input dtype. In a
    bf16 result (8 significant bits) the counts of K^T V (up to N) and Q (K^T V) (up to N d) would round
    above 256 and move attention spikes. ``products``:

    - "fp32": both products in float32 (at least) outside autocast: the reference;
    - "bf16": bf16 GEMMs with float32 accumulation and output (``_spike_attention_bf16``): the same
      values while N <= 256 (``BF16_EXACT_COUNT``), rounded K^T V counts beyond;
    - "auto" (default): "bf16" on a GPU when N <= 256 (224 px: N = 196, MIM's visible tokens fewer),
      "fp32" otherwise (the CPU has no bf16 GEMM with a float32 result; float64 input is a reference).
    """
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    if products == "auto":
        gpu = q.device.type not in ("cpu", "meta") and q.dtype != torch.float64
        products = "bf16" if gpu and q.shape[-1] <= BF16_EXACT_COUNT else "fp32"
    if products == "bf16":
        return _spike_attention_bf16(q, k, v, scale)
    dtype = torch.promote_types(q.dtype, torch.float32)
    with _no_autocast(q.device.type):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        kv = k @ v.transpose(-1, -2)  # [..., d, d] = (K^T V) per head
        return (kv.transpose(-1, -2) @ q) * scale  # [..., d, N] = (Q K^T V)^T


class SSA(nn.Module):
    """Spiking Self-Attention: Q, K, V spikes, out = LIF_{0.5}(Q (K^T V) * scale), no softmax.

    K^T V is computed first ([d, d] per head: O(N d^2)); no N x N tensor and no loop over heads.
    The products are exact under bf16; ``products`` chooses how they run (``spike_attention``: "auto",
    bf16 tensor-core GEMMs on a GPU while the counts stay exact, "fp32" the reference).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        scale: float = 0.125,
        attn_v_threshold: float = 0.5,
        lif_kwargs: dict | None = None,
        products: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if products not in PRODUCTS:
            raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
        lif_kwargs = lif_kwargs or {}
        self.dim = dim
        self.num_heads = num_heads
        self.scale = scale
        self.products = products
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
        return _fire(getattr(self, f"{name}_lif"), _norm(getattr(self, f"{name}_bn"), y, mask), T, mask)

    def forward(self, x: torch.Tensor, mask: VisibleMask | None = None) -> torch.Tensor:
        T, B, C, H, W = x.shape
        N = H * W
        rows = x.flatten(3).flatten(0, 1)  # [T*B, C, N]
        heads = (T, B, self.num_heads, C // self.num_heads, N)
        q = self._spikes("q", rows, T, mask).reshape(heads)
        k = self._spikes("k", rows, T, mask).reshape(heads)
        v = self._spikes("v", rows, T, mask).reshape(heads)
        out = spike_attention(q, k, v, self.scale, self.products)  # [T, B, h, d, N], float32 at least
        out = _fire(self.attn_lif, out.reshape(T * B, C, N), T, mask).to(rows.dtype)  # spikes: exact
        out = _zero_masked(mask, self.proj_conv(out))
        out = _fire(self.proj_lif, _norm(self.proj_bn, out, mask), T, mask)
        return out.reshape(T, B, C, H, W)


class SoftmaxSelfAttention(nn.Module):
    """The non-spiking control for SSA (ablation ``attention="softmax"``): the same block, real-valued.

    Exactly SSA with its four neurons on Q, K, V and the attention output removed and softmax
    attention in place of Q K^T V * scale: Q, K, V = BN(Conv1x1(x)) are real numbers (no LIF);
    out = softmax(Q K^T / sqrt(d)) V per head and time step (``F.scaled_dot_product_attention``); then
    the same projection Conv1x1 -> BN -> LIF as SSA, so the block still outputs spikes to the residual
    stream. The parameters (and their names) are SSA's, so parameter counts and checkpoints match.
    Under a mask (MIM's dense path) masked keys are excluded from the softmax, so masked tokens still
    contribute nothing and the visible-token path computes the same function. Energy: its attention
    products and the projection see real-valued inputs, so ``models.energy`` charges them as MACs.
    """

    def __init__(self, dim: int, num_heads: int = 8, lif_kwargs: dict | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_conv", nn.Conv1d(dim, dim, kernel_size=1, stride=1, bias=False))
            setattr(self, f"{name}_bn", MaskedBatchNorm1d(dim))
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1, stride=1)
        self.proj_bn = MaskedBatchNorm1d(dim)
        self.proj_lif = MultiStepLIF(**(lif_kwargs or {}))

    def attention_flops(self, num_tokens: int) -> tuple[int, int]:
        """Multiply-accumulates of (Q K^T, softmax(.) V) per image and time step."""
        flops = num_tokens * num_tokens * self.dim  # heads * (N x d @ d x N)
        return flops, flops

    def _project(self, name: str, x: torch.Tensor, mask: VisibleMask | None) -> torch.Tensor:
        y = _zero_masked(mask, getattr(self, f"{name}_conv")(x))
        return _norm(getattr(self, f"{name}_bn"), y, mask)

    def forward(self, x: torch.Tensor, mask: VisibleMask | None = None) -> torch.Tensor:
        T, B, C, H, W = x.shape
        N = H * W
        rows = x.flatten(3).flatten(0, 1)  # [T*B, C, N]
        heads = (T * B, self.num_heads, C // self.num_heads, N)
        q, k, v = (self._project(n, rows, mask).reshape(heads).transpose(-1, -2) for n in "qkv")  # [TB, h, N, d]
        keys = None if mask is None else mask.token_rows().unsqueeze(1)  # [TB, 1, 1, N]: visible keys
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)  # [TB, h, N, d]
        out = out.transpose(-1, -2).reshape(T * B, C, N)
        out = _zero_masked(mask, self.proj_conv(out))
        out = _fire(self.proj_lif, _norm(self.proj_bn, out, mask), T, mask)
        return out.reshape(T, B, C, H, W)


ATTENTIONS = ("ssa", "softmax")


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
        y = _fire(self.fc1_lif, _norm(self.fc1_bn, y, mask), T, mask)
        y = _zero_masked(mask, self.fc2_conv(y))
        y = _fire(self.fc2_lif, _norm(self.fc2_bn, y, mask), T, mask)
        return y.reshape(x.shape)


class Block(nn.Module):
    """x = x + SSA(x); x = x + MLP(x) (SEW-style ADD), with stochastic depth on both branches.

    ``attention="softmax"`` puts ``SoftmaxSelfAttention`` (the non-spiking control) in place of SSA.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attn_scale: float = 0.125,
        attn_v_threshold: float = 0.5,
        lif_kwargs: dict | None = None,
        attention: str = "ssa",
        drop_path_enabled: bool | None = None,
    ) -> None:
        super().__init__()
        if attention == "ssa":
            self.attn = SSA(dim, num_heads, attn_scale, attn_v_threshold, lif_kwargs)
        elif attention == "softmax":
            self.attn = SoftmaxSelfAttention(dim, num_heads, lif_kwargs)
        else:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.mlp = MLP(dim, int(dim * mlp_ratio), lif_kwargs)
        self.drop_path = TimeDropPath(drop_path, drop_path_enabled)

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
        attention: "ssa" (Spiking Self-Attention) or "softmax" (``SoftmaxSelfAttention``: the same
            block with real-valued Q/K/V and softmax attention, the non-spiking ablation control).
        scs_extra_convs, scs_residual: SCS supplementary layer layout (see ``SCS``).
        lif_kwargs: extra ``MultiStepLIF`` arguments for every neuron (tau, alpha, backend, ...).
        stem_layout: memory layout of the stem's convolutions: "auto" (channels_last on CUDA under
            torch.compile), "channels_last" or "contiguous" (``SPS.channels_last``); values are the same.
        neuron: "lif" (the spiking network) or "relu": every LIF replaced by max(x, 0) (``Rectifier``),
            the non-spiking control of the same width, depth, stem, BatchNorms and attention layout.
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
        attention: str = "ssa",
        stem_layout: str = "auto",
        neuron: str = "lif",
    ) -> None:
        super().__init__()
        if neuron not in NEURONS:
            raise ValueError(f"neuron must be one of {NEURONS}, got {neuron!r}")
        if stem_layout not in SPS.LAYOUTS:
            raise ValueError(f"stem_layout must be one of {SPS.LAYOUTS}, got {stem_layout!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
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
        self.attention = attention
        if stem == "sps":
            self.patch_embed = SPS(in_chans, embed_dim, stem_pools, lif_kwargs)
        elif stem == "scs":
            self.patch_embed = SCS(in_chans, embed_dim, stem_pools, scs_extra_convs, scs_residual, lif_kwargs)
        else:
            raise ValueError(f"stem must be 'sps' or 'scs', got {stem!r}")
        self.patch_embed.layout = stem_layout
        self.patch_stride = self.patch_embed.stride
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.block = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, rate, attn_scale, attn_v_threshold, lif_kwargs, attention,
                  drop_path_enabled=drop_path_rate > 0)  # one switch for all blocks: one compile guard
            for rate in rates
        )
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.neuron = neuron
        replace_neurons(self, neuron)
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

    def forward_tokens(
        self, x: torch.Tensor, active: torch.Tensor | None = None, *, indexed_bn: bool = False
    ) -> torch.Tensor:
        """Encoder output before pooling, [T, B, D, h, w].

        ``x``: images [B, C, H, W] (repeated ``self.T`` times) or a spike/frame sequence [T, B, C, H, W].
        ``active``: optional bool [B, 1, h, w] on the token grid (True = visible). When given, every
        output at a visible position is independent of the input at masked positions, and masked
        positions of the output are zero. ``indexed_bn`` runs the masked BatchNorms through their
        boolean-indexing reference (``forward_indexed``) instead of masked sums: the original path.
        """
        x = self._encode_input(x)
        mask = None
        if active is not None:
            self._check_active(active, x)
            mask = VisibleMask(active, x.shape[0], indexed_bn=indexed_bn)
        x = self.patch_embed(x, mask)
        if mask is not None:
            x = mask.apply_seq(x)
        for blk in self.block:
            x = blk(x, mask)
        return x

    def forward_visible(self, x: torch.Tensor, active: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Encoder output at the visible tokens only, [T, B, D, n]: MIM's fast path.

        ``active``: bool [B, 1, h, w] (True = visible), as for ``forward_tokens``; ``index``: int64
        [B, n], per sample n distinct visible positions of the row-major token grid (the same n for
        every sample; the output follows this order). The stem runs dense and masked up to the token
        grid, then its token-grid layers and all blocks run on the n gathered tokens, whose plain
        BatchNorm statistics are visible-only statistics. Equal to ``forward_tokens(x, active)`` at
        those positions (masked tokens contribute nothing to K^T V; every other op is per token), at
        about n / (h w) of the blocks' cost. ``index`` is trusted to match ``active``: it is not
        checked, as that would need a host sync.
        """
        x = self._encode_input(x)
        self._check_active(active, x)
        T, grid = x.shape[0], tuple(active.shape[-2:])
        if index.shape[0] != active.shape[0] or not 0 < index.shape[-1] <= grid[0] * grid[1]:
            raise ValueError(f"index must be [{active.shape[0]}, n] with 0 < n <= {grid[0] * grid[1]}, "
                             f"got {tuple(index.shape)}")
        tokens = self.patch_embed(x, VisibleMask(active, T), VisibleTokens(index, grid, T))  # [T, B, D, n]
        tokens = tokens.unsqueeze(3)  # [T, B, D, 1, n]: the blocks' [T, B, C, H, W] layout
        for blk in self.block:
            tokens = blk(tokens)
        return tokens.squeeze(3)

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
