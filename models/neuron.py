"""Multi-step leaky integrate-and-fire (LIF) neuron with a sigmoid surrogate gradient.

Dynamics (SpikingJelly's multi-step LIF with ``decay_input=True``, as used by Spikformer):

    H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau        # charge
    S[t] = Heaviside(H[t] - V_th)                           # fire (1 if H >= V_th)
    V[t] = H[t] * (1 - S[t]) + V_reset * S[t]               # hard reset (V_reset is a number)
    V[t] = H[t] - V_th * S[t]                               # soft reset (V_reset is None)

``V[-1] = V_reset`` (0 for a soft reset). The reset uses ``S`` detached from the graph when
``detach_reset`` is set (Spikformer does). The backward pass of the Heaviside step is the derivative
of ``sigmoid(alpha * x)``, ``alpha * sig(alpha x) * (1 - sig(alpha x))`` with ``x = H - V_th``.

The membrane state lives only inside one call, so no global ``reset_net`` is needed between batches.
All time steps are in the input tensor ``[T, B, ...]``.

``lif_multistep`` is the single dispatch point: it looks up an implementation by backend name, so a
fused kernel can be registered with ``register_lif_backend`` and selected per module without touching
the networks. Built in: "torch" (this reference, the oracle), "triton" (``models.lif_triton``, fused
kernels for CUDA tensors) and "auto" (the default: "triton" for CUDA inputs when Triton is installed,
"torch" otherwise, e.g. on CPU, and inside torch.compile, whose Inductor fuses the reference).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LifImpl = Callable[[torch.Tensor, float, float, "float | None", float, bool], torch.Tensor]


class SigmoidSurrogateSpike(torch.autograd.Function):
    """Heaviside step forward, derivative of sigmoid(alpha * x) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * x)
        return grad_output * (ctx.alpha * sig * (1.0 - sig)), None


def spike(x: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """Heaviside(x) with the sigmoid surrogate gradient of slope ``alpha``."""
    return SigmoidSurrogateSpike.apply(x, alpha)


def _charge(v: torch.Tensor | None, x_t: torch.Tensor, tau: float, v_reset: float | None) -> torch.Tensor:
    """H[t]; ``v=None`` is the initial state V = V_reset (0 for a soft reset), where H = V_reset + X / tau."""
    rest = 0.0 if v_reset is None else v_reset
    if v is None:
        return x_t / tau + rest if rest else x_t / tau
    return v + (x_t - (v - rest)) / tau


def _reset(h: torch.Tensor, s: torch.Tensor, v_threshold: float, v_reset: float | None) -> torch.Tensor:
    if v_reset is None:
        return h - v_threshold * s
    return h * (1.0 - s) + v_reset * s


def lif_step(
    v: torch.Tensor | None,
    x_t: torch.Tensor,
    tau: float,
    v_threshold: float,
    v_reset: float | None,
    alpha: float,
    detach_reset: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One time step from membrane ``v`` (None: resting): returns (spike S[t], charge H[t], V[t])."""
    h = _charge(v, x_t, tau, v_reset)
    s = spike(h - v_threshold, alpha)
    return s, h, _reset(h, s.detach() if detach_reset else s, v_threshold, v_reset)


def lif_multistep_reference(
    x: torch.Tensor,
    tau: float,
    v_threshold: float,
    v_reset: float | None,
    alpha: float,
    detach_reset: bool,
) -> torch.Tensor:
    """Pure PyTorch LIF over the leading time dimension of ``x`` ([T, B, ...]); returns spikes.

    The resting first step and the unused reset after the last step are skipped (T=1 costs 3 ops).
    """
    v = None
    spikes = []
    for t, x_t in enumerate(x):
        h = _charge(v, x_t, tau, v_reset)
        s = spike(h - v_threshold, alpha)
        if t + 1 < x.shape[0]:
            v = _reset(h, s.detach() if detach_reset else s, v_threshold, v_reset)
        spikes.append(s)
    return torch.stack(spikes)


def _lif_triton(*args) -> torch.Tensor:
    from .lif_triton import lif_multistep_triton  # imports triton only when asked for

    return lif_multistep_triton(*args)


def _lif_auto(x: torch.Tensor, *args) -> torch.Tensor:
    # Under torch.compile the reference is traced and Inductor fuses it into its own kernels; the
    # Triton launch is opaque to the compiler (a graph break per neuron).
    if x.is_cuda and not torch.compiler.is_compiling():
        from . import lif_triton

        if lif_triton.can_run(x):
            return lif_triton.lif_multistep_triton(x, *args)
    return lif_multistep_reference(x, *args)


_BACKENDS: dict[str, LifImpl] = {"torch": lif_multistep_reference, "triton": _lif_triton, "auto": _lif_auto}


def register_lif_backend(name: str, impl: LifImpl) -> None:
    """Make ``impl`` selectable as ``MultiStepLIF(backend=name)``; same signature as the reference."""
    _BACKENDS[name] = impl


def lif_backends() -> list[str]:
    return sorted(_BACKENDS)


def lif_multistep(
    x: torch.Tensor,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    alpha: float = 4.0,
    detach_reset: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Spikes [T, B, ...] of a LIF neuron driven by ``x`` [T, B, ...], using the chosen backend."""
    try:
        impl = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown LIF backend {backend!r}; registered: {lif_backends()}") from None
    if x.dim() < 2:
        raise ValueError(f"LIF input must be [T, B, ...], got shape {tuple(x.shape)}")
    return impl(x, tau, v_threshold, v_reset, alpha, detach_reset)


class MultiStepLIF(nn.Module):
    """LIF neuron layer over [T, B, ...] inputs (defaults: Spikformer's tau=2, V_th=1, V_reset=0)."""

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        alpha: float = 4.0,
        detach_reset: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = tau
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.alpha = alpha
        self.detach_reset = detach_reset
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lif_multistep(x, self.tau, self.v_threshold, self.v_reset, self.alpha, self.detach_reset, self.backend)

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
            f"alpha={self.alpha}, detach_reset={self.detach_reset}, backend={self.backend!r}"
        )


class Rectifier(nn.Module):
    """The non-spiking control's activation, max(x, 0) over [T, B, ...]: what a LIF neuron becomes in a
    network built with ``neuron="relu"`` (the ablation that separates "MIM at this budget" from
    "spiking MIM"). ``clamp``'s backward reads its input, not its output, so the masked stem may zero
    the output in place as it does a LIF's; ``nn.ReLU``'s backward reads the output it returned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0)


NEURONS = ("lif", "relu")


def replace_neurons(module: nn.Module, neuron: str) -> None:
    """Swap every ``MultiStepLIF`` inside ``module`` for the ``neuron`` kind ("lif" leaves them)."""
    if neuron not in NEURONS:
        raise ValueError(f"neuron must be one of {NEURONS}, got {neuron!r}")
    if neuron == "lif":
        return
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MultiStepLIF):
                setattr(parent, name, Rectifier())
