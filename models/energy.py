"""Firing rates, operation counts and the energy estimate of the Spikformer paper (App. C.2).

Conventions (those of the paper):
* FLOPs are multiply-accumulates (MACs) of the dense layer, per image and per time step: convs,
  linears, and the two attention products K^T V and Q (K^T V) (each N * d * D per SSA).
* The firing rate of a layer's input is the mean of the spike tensor that feeds it (spike count per
  element: the SEW residual stream carries integers, and a 2 costs two accumulates).
* SOPs(l) = rate(l) * T * FLOPs(l); accumulate-only layers cost E_AC = 0.9 pJ per SOP.
* Layers with analog (non-spike) input are MAC layers: E_MAC = 4.6 pJ per MAC, T * FLOPs of them
  (the first conv sees the image at each time step; the paper's 8-512 row, 11.577 mJ =
  4.6 pJ * 4 * 86.7M + 0.9 pJ * 11.09G, confirms the factor T). By default these are the first conv
  and the classifier ``head`` (its input is the T- and token-average, a real number, applied once).
* Energy per image = sum of the MAC and AC terms. The attention rows use the rate of the event
  operand: K for K^T V (each K spike adds a row of V), Q for Q (K^T V).
* The softmax-attention ablation (``SoftmaxSelfAttention``): Q K^T and softmax(.) V (N^2 D each) and
  the projection after them have real-valued operands, so they are MAC rows.
* The non-spiking control (``neuron="relu"``: every LIF a ``Rectifier``) has no spikes anywhere: every
  row, attention products included, is a MAC row, and there are no firing rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .neuron import MultiStepLIF, Rectifier
from .spikformer import SSA, SoftmaxSelfAttention

E_MAC_PJ = 4.6
E_AC_PJ = 0.9


@dataclass
class EnergyRow:
    layer: str
    kind: str  # "conv", "linear" or "attn"
    mac: bool  # analog input: charged per MAC instead of per SOP
    rate: float | None  # mean spike count per input element; None for MAC layers
    flops: int  # MACs of the dense layer per image per time step (per image for the head)
    sops: float  # synaptic operations per image (0 for MAC layers)
    pj: float  # energy per image, picojoules


@dataclass
class EnergyReport:
    rows: list[EnergyRow]
    firing_rates: dict[str, float]  # every LIF: mean output spike rate
    T: int
    images: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def total_sops(self) -> float:
        return sum(r.sops for r in self.rows)

    @property
    def total_pj(self) -> float:
        return sum(r.pj for r in self.rows)

    @property
    def total_mj(self) -> float:
        return self.total_pj * 1e-9

    def to_dict(self) -> dict:
        return {
            "T": self.T,
            "images": self.images,
            "total_flops": self.total_flops,
            "total_sops": self.total_sops,
            "total_pj": self.total_pj,
            "total_mj": self.total_mj,
            "rows": [asdict(r) for r in self.rows],
            "firing_rates": dict(self.firing_rates),
        }

    def to_markdown(self) -> str:
        lines = ["| layer | type | rate | FLOPs | SOPs | energy (pJ) |", "|---|---|---:|---:|---:|---:|"]
        for r in self.rows:
            rate = "analog" if r.rate is None else f"{r.rate:.4f}"
            kind = f"{r.kind} (MAC)" if r.mac else r.kind
            lines.append(f"| {r.layer} | {kind} | {rate} | {r.flops:,} | {r.sops:,.0f} | {r.pj:,.0f} |")
        lines.append(
            f"| **total** (T={self.T}, {self.images} images) | | | {self.total_flops:,} | "
            f"{self.total_sops:,.0f} | {self.total_pj:,.0f} ({self.total_mj:.4f} mJ) |"
        )
        return "\n".join(lines)


def _dense_flops_per_row(module: nn.Module, out: torch.Tensor) -> int:
    """MACs per leading row (one image and time step) of a conv or linear output."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return out[0].numel() * per_output
    return out[0].numel() * module.in_features


def default_mac_layers(model: nn.Module) -> list[str]:
    """The first conv (receives the image) and a Linear ``head``: the layers with analog input."""
    names = []
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))), None)
    if first_conv is not None:
        names.append(first_conv)
    if isinstance(getattr(model, "head", None), nn.Linear):
        names.append("head")
    return names


class EnergyMeter:
    """Accumulates rates and operation counts over forward passes; ``report()`` gives per-image values."""

    def __init__(self, model: nn.Module, mac_layers: Sequence[str] | None = None) -> None:
        self.model = model
        self.mac_layers = set(default_mac_layers(model) if mac_layers is None else mac_layers)
        # Real-valued activations (the no-LIF control): every operation is a multiply-accumulate.
        self.analog = any(isinstance(m, Rectifier) for m in model.modules())
        self.images = 0
        self._lif: dict[str, list[float]] = {}  # name -> [sum, numel] over all calls
        self._last_lif: dict[str, float] = {}  # name -> rate in the latest call
        self._layers: dict[str, dict] = {}  # name -> kind, flops, rows, input sum/numel, sops

    # --- hooks ------------------------------------------------------------------------------------

    def _lif_hook(self, name: str):
        def hook(module, inputs, out):
            total, count = float(out.sum()), out.numel()
            acc = self._lif.setdefault(name, [0.0, 0])
            acc[0] += total
            acc[1] += count
            self._last_lif[name] = total / count

        return hook

    def _entry(self, name: str, kind: str, flops: int) -> dict:
        entry = self._layers.setdefault(
            name, {"kind": kind, "flops": flops, "rows": 0, "in_sum": 0.0, "in_numel": 0, "sops": 0.0}
        )
        if entry["flops"] != flops:
            raise ValueError(
                f"{name}: FLOPs per image changed between batches ({entry['flops']} vs {flops}); "
                "measure one input size at a time"
            )
        return entry

    def _dense_hook(self, name: str, kind: str):
        def hook(module, inputs, out):
            x = inputs[0]
            entry = self._entry(name, kind, _dense_flops_per_row(module, out))
            rows, total = out.shape[0], float(x.sum())
            entry["rows"] += rows
            entry["in_sum"] += total
            entry["in_numel"] += x.numel()
            entry["sops"] += total / x.numel() * entry["flops"] * rows

        return hook

    def _attn_hook(self, name: str):
        def hook(module: SSA, inputs, out):
            T, B, _, H, W = out.shape
            kv_flops, qkv_flops = module.attention_flops(H * W)
            if self.analog:  # real-valued Q, K, V: the products are MACs, no event operand
                for suffix, flops in (("kv", kv_flops), ("qkv", qkv_flops)):
                    self._entry(f"{name}.{suffix}", "attn", flops)["rows"] += T * B
                return
            for suffix, flops, operand in (("kv", kv_flops, "k_lif"), ("qkv", qkv_flops, "q_lif")):
                rate = self._last_lif[f"{name}.{operand}"]
                entry = self._entry(f"{name}.{suffix}", "attn", flops)
                entry["rows"] += T * B
                entry["in_sum"] += rate * T * B
                entry["in_numel"] += T * B
                entry["sops"] += rate * flops * T * B

        return hook

    def _softmax_attn_hook(self, name: str):
        """Real-valued products (Q K^T, softmax(.) V) and the projection of their output: MACs."""
        self.mac_layers.update({f"{name}.qk", f"{name}.av", f"{name}.proj_conv"})

        def hook(module: SoftmaxSelfAttention, inputs, out):
            T, B, _, H, W = out.shape
            for suffix, flops in zip(("qk", "av"), module.attention_flops(H * W), strict=True):
                entry = self._entry(f"{name}.{suffix}", "attn", flops)
                entry["rows"] += T * B

        return hook

    def _register(self) -> list:
        handles = []
        for name, module in self.model.named_modules():
            if isinstance(module, MultiStepLIF):
                handles.append(module.register_forward_hook(self._lif_hook(name)))
            elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
                handles.append(module.register_forward_hook(self._dense_hook(name, "conv")))
            elif isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(self._dense_hook(name, "linear")))
            elif isinstance(module, SSA):
                handles.append(module.register_forward_hook(self._attn_hook(name)))
            elif isinstance(module, SoftmaxSelfAttention):
                handles.append(module.register_forward_hook(self._softmax_attn_hook(name)))
        return handles

    # --- use --------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """One eval-mode forward pass over ``images`` ([B, C, H, W] or [T, B, C, H, W])."""
        handles = self._register()
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(images)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        self.images += images.shape[0] if images.dim() == 4 else images.shape[1]

    def firing_rates(self) -> dict[str, float]:
        return {name: total / count for name, (total, count) in self._lif.items()}

    def report(self) -> EnergyReport:
        if not self.images:
            raise ValueError("no images measured yet: call update(images) first")
        rows = []
        for name, e in self._layers.items():
            rows_per_image = e["rows"] / self.images
            mac = self.analog or name in self.mac_layers
            if mac:
                rows.append(
                    EnergyRow(name, e["kind"], True, None, e["flops"], 0.0, E_MAC_PJ * e["flops"] * rows_per_image)
                )
            else:
                sops = e["sops"] / self.images
                rows.append(
                    EnergyRow(name, e["kind"], False, e["in_sum"] / e["in_numel"], e["flops"], sops, E_AC_PJ * sops)
                )
        return EnergyReport(rows, self.firing_rates(), int(getattr(self.model, "T", 1)), self.images)


def _batches(images: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    return [images] if isinstance(images, torch.Tensor) else images


def measure_energy(
    model: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    mac_layers: Sequence[str] | None = None,
) -> EnergyReport:
    """Per-image rates, FLOPs, SOPs and energy of ``model`` (eval mode, no grad) over the batches."""
    meter = EnergyMeter(model, mac_layers)
    for batch in _batches(images):
        meter.update(batch)
    return meter.report()


def firing_rates(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean output spike rate of every LIF layer (eval mode, no grad), keyed by module name."""
    meter = EnergyMeter(model, mac_layers=())
    for batch in _batches(images):
        meter.update(batch)
    return meter.firing_rates()


class FiringRateProbe:
    """Records LIF firing rates during the forward passes a caller runs anyway (e.g. training steps).

        with FiringRateProbe(model) as probe:
            loss = criterion(model(images), labels)
        metrics = probe.rates()  # {"block.0.attn.q_lif": 0.07, ...}

    Sums stay on the model's device until ``rates()``, so the probe adds no host synchronisation.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> FiringRateProbe:
        for name, module in self.model.named_modules():
            if isinstance(module, MultiStepLIF):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, inputs, out):
            total = out.detach().sum(dtype=torch.float64)
            self._sums[name] = self._sums[name] + total if name in self._sums else total
            self._counts[name] = self._counts.get(name, 0) + out.numel()

        return hook

    def rates(self) -> dict[str, float]:
        return {name: float(total) / self._counts[name] for name, total in self._sums.items()}


@torch.no_grad()
def count_flops(model: nn.Module, img_size: int | tuple[int, int], in_chans: int | None = None) -> dict[str, int]:
    """Dense MACs per image per time step for every conv, linear and attention product.

    Runs one T=1 forward on a batch of one zero image on the model's device; a model built on the
    meta device is counted without allocating weights.
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    channels = in_chans or getattr(model, "in_chans", 3)
    flops: dict[str, int] = {}

    def dense(name):
        return lambda m, i, o: flops.__setitem__(name, _dense_flops_per_row(m, o))

    def attn(name, suffixes):
        def hook(m: SSA | SoftmaxSelfAttention, i, o):
            first, second = m.attention_flops(o.shape[-2] * o.shape[-1])
            flops[f"{name}.{suffixes[0]}"], flops[f"{name}.{suffixes[1]}"] = first, second

        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(dense(name)))
        elif isinstance(module, SSA):
            handles.append(module.register_forward_hook(attn(name, ("kv", "qkv"))))
        elif isinstance(module, SoftmaxSelfAttention):
            handles.append(module.register_forward_hook(attn(name, ("qk", "av"))))
    param = next(model.parameters())
    saved_T, was_training = getattr(model, "T", None), model.training
    try:
        if saved_T is not None:
            model.T = 1
        model.eval()
        model(torch.zeros(1, channels, height, width, device=param.device, dtype=param.dtype))
    finally:
        if saved_T is not None:
            model.T = saved_T
        model.train(was_training)
        for h in handles:
            h.remove()
    return flops
