"""Fused multi-step LIF in Triton: one kernel for the forward over all T steps, one for the backward.

Same signature and results as ``models.neuron.lif_multistep_reference``:

- forward kernel: each program owns BLOCK neurons and walks t = 0..T-1 keeping the membrane in
  registers; it writes the spikes S[t] and ``Z[t] = H[t] - V_th`` (the value the surrogate needs).
- backward kernel: walks t = T-1..0 keeping dL/dV[t] in registers and writes dL/dX[t].

Memory: the forward stores exactly one value per element and step, Z (in the input dtype), the same as
the reference stores per spike call; the spike itself is re-derived as ``Z >= 0`` and H as ``Z + V_th``
(only for ``detach_reset=False``), so no spike mask, membrane or input is kept for the backward.

Exactness: arithmetic runs in float32 and, like PyTorch's bf16/fp16 elementwise ops, every
intermediate of the charge is rounded to the input dtype, with IEEE division (``div_rn``) by tau: the
spikes equal the reference's bit for bit. Gradients are computed in float32 and rounded once.

Triton compiles for CUDA tensors; with ``TRITON_INTERPRET=1`` it runs (slowly) on CPU tensors, which
is how the tests check it without a GPU. Kernels are built on first use so that setting
``TRITON_INTERPRET`` before the first call is enough.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024


def available() -> bool:
    """Triton importable (the kernels can be built)."""
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def can_run(x: torch.Tensor) -> bool:
    """Whether the fused kernels accept ``x``: Triton present, CUDA tensor (or interpreter), a float dtype."""
    return available() and x.dtype in SUPPORTED_DTYPES and (x.is_cuda or interpreting())


def _round_src(x, KIND: tl.constexpr):  # noqa: N803
    """Round float32 ``x`` to the input dtype (KIND 0: fp32, 1: bf16, 2: fp16), kept as float32.

    bf16 is rounded to nearest-even with integer ops: the same on GPUs and in the interpreter (whose
    plain fp32 -> bf16 cast truncates).
    """
    if KIND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16  # uint32 throughout
        return bits.to(tl.float32, bitcast=True)
    elif KIND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


_round = _round_src  # the kernels' callee; _kernels rebinds it to the jitted version of the mode


def _forward_src(X, S, Z, M, T, tau, v_th, v_reset, v_th_q, v_reset_q,  # noqa: N803
                 HARD: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    dtype = X.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    rest = v_reset if HARD else 0.0
    v = tl.full([BLOCK], rest, tl.float32)
    idx = offs
    for _ in range(T):
        x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
        # H = V + (X - (V - rest)) / tau, rounded to the input dtype after each op like the reference
        leak = _round(x - _round(v - rest, KIND), KIND)
        h = _round(v + _round(tl.math.div_rn(leak, tau), KIND), KIND)
        z = _round(h - v_th, KIND)  # exact in the input dtype: the casts below do not round
        fired = z >= 0.0
        tl.store(S + idx, tl.where(fired, 1.0, 0.0).to(dtype), mask=mask)
        tl.store(Z + idx, z.to(dtype), mask=mask)
        if HARD:
            v = tl.where(fired, v_reset_q, h)
        else:
            v = tl.where(fired, _round(h - v_th_q, KIND), h)
        idx += M


def _backward_src(GS, Z, GX, M, T, LAST, tau, v_th, v_reset, alpha,  # noqa: N803
                  HARD: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    dtype = GX.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    grad_v = tl.full([BLOCK], 0.0, tl.float32)  # dL/dV[t]; V[T-1] is never used
    idx = offs + LAST  # (T - 1) * M
    for _ in range(T):
        z = tl.load(Z + idx, mask=mask, other=0.0).to(tl.float32)
        grad_s = tl.load(GS + idx, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-alpha * z))
        surrogate = alpha * sig * (1.0 - sig)
        fired = z >= 0.0
        # dV[t]/dH[t] of the reset; with detach_reset the spike is a constant there
        if HARD:
            dv_dh = tl.where(fired, 0.0, 1.0)
            if not DETACH:
                dv_dh += surrogate * (v_reset - (z + v_th))
        else:
            dv_dh = tl.full([BLOCK], 1.0, tl.float32)
            if not DETACH:
                dv_dh -= v_th * surrogate
        grad_h = grad_s * surrogate + grad_v * dv_dh
        grad_x = tl.math.div_rn(grad_h, tau)
        tl.store(GX + idx, _round(grad_x, KIND).to(dtype), mask=mask)
        grad_v = grad_h - grad_x  # H = V + (X - V + rest) / tau  ->  dH/dV = 1 - 1/tau
        idx -= M


@functools.cache
def _kernels(interpret: bool) -> tuple:
    """Build (jit) the kernels once per mode (Triton reads TRITON_INTERPRET when decorating).

    The kernels call ``_round`` by name; each mode gets its own copy of the functions whose globals
    hold that mode's ``_round``, so interpreted and compiled kernels can live in one process.
    """
    scope = {**globals(), "_round": triton.jit(_round_src)}

    def rebind(fn):
        return functools.update_wrapper(types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__), fn)

    return triton.jit(rebind(_forward_src)), triton.jit(rebind(_backward_src))


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` as the reference sees it in ``value * spike``: rounded to the input dtype."""
    return torch.tensor(value, dtype=dtype).item()


def _grid(m: int) -> tuple[int]:
    return (triton.cdiv(m, BLOCK),)


def _on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU even when another one is current."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class FusedLIF(torch.autograd.Function):
    """Autograd wrapper of the two kernels; inputs [T, ...] (any trailing shape)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tau: float, v_threshold: float, v_reset: float | None, alpha: float,
                detach_reset: bool) -> torch.Tensor:
        forward_kernel, _ = _kernels(interpreting())
        x = x.contiguous()
        T, m = x.shape[0], x[0].numel()
        spikes, z = torch.empty_like(x), torch.empty_like(x)
        hard = v_reset is not None
        v_reset = float(v_reset) if hard else 0.0
        with _on_device(x):
            forward_kernel[_grid(m)](x, spikes, z, m, T, float(tau), float(v_threshold), v_reset,
                                     _rounded(v_threshold, x.dtype), _rounded(v_reset, x.dtype), HARD=hard,
                                     KIND=_KINDS[x.dtype], BLOCK=BLOCK)
        ctx.save_for_backward(z)
        ctx.params = (float(tau), float(v_threshold), v_reset, float(alpha), hard,
                      bool(detach_reset))
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor) -> tuple:
        _, backward_kernel = _kernels(interpreting())
        (z,) = ctx.saved_tensors
        tau, v_th, v_reset, alpha, hard, detach = ctx.params
        grad_spikes = grad_spikes.contiguous()
        grad_x = torch.empty_like(z)
        T, m = z.shape[0], z[0].numel()
        with _on_device(z):
            backward_kernel[_grid(m)](grad_spikes, z, grad_x, m, T, (T - 1) * m, tau, v_th, v_reset, alpha,
                                      HARD=hard, DETACH=detach, KIND=_KINDS[z.dtype], BLOCK=BLOCK)
        return grad_x, None, None, None, None, None


@torch.compiler.disable  # opaque to torch.compile: a clean graph break around the kernels (not verified on GPU)
def lif_multistep_triton(
    x: torch.Tensor,
    tau: float,
    v_threshold: float,
    v_reset: float | None,
    alpha: float,
    detach_reset: bool,
) -> torch.Tensor:
    """Fused LIF spikes of ``x`` [T, B, ...]; same arguments and results as the PyTorch reference."""
    if not available():
        raise ValueError("the 'triton' LIF backend needs the triton package (pip install triton)")
    if not can_run(x):
        raise ValueError(
            f"the 'triton' LIF backend needs a CUDA tensor (or TRITON_INTERPRET=1) of dtype "
            f"{[str(d) for d in SUPPORTED_DTYPES]}; got {x.device} {x.dtype}"
        )
    if x.numel() == 0:
        return torch.zeros_like(x)
    return FusedLIF.apply(x, tau, v_threshold, v_reset, alpha, detach_reset)
