"""Multi-step LIF forward+backward: PyTorch reference loop vs the fused Triton kernels.

    python benchmarks/lif_speed.py [--T 1 4] [--elements 64M] [--dtype float32 bfloat16] [--device cuda]
        [--iters 20] [--threads N] [--note TEXT] [--no-record]

``--elements`` is the input's total size (all T steps). On CUDA both the reference and the fused
path run, and the fused path's traffic is compared to the device's measured copy bandwidth: the fused
forward reads X and writes S and Z, the backward reads dS and Z and writes dX, so one forward+backward
moves 6 x elements x itemsize bytes (the minimum for this interface). On CPU only the reference runs
(Triton compiles for GPUs; its CPU interpreter is a correctness tool, far too slow to time).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import record_section  # noqa: E402
from models import lif_triton  # noqa: E402
from models.neuron import lif_multistep_reference  # noqa: E402

LIF_ARGS = (2.0, 1.0, 0.0, 4.0, True)  # Spikformer: tau 2, V_th 1, hard reset to 0, alpha 4, detached reset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def copy_bandwidth_gbs(device: torch.device, numel: int, dtype: torch.dtype, iters: int) -> float:
    """Device-to-device copy rate (read + write bytes per second) of a tensor of ``numel`` elements."""
    src = torch.empty(numel, device=device, dtype=dtype).fill_(1)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, iters)
    return 2 * numel * src.element_size() / seconds / 1e9


def measure(impl: str, T: int, numel: int, dtype: torch.dtype, device: torch.device, iters: int) -> dict:
    fn = lif_triton.lif_multistep_triton if impl == "fused" else lif_multistep_reference
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(T, numel // T, device=device, generator=gen) * 1.5).to(dtype).requires_grad_()
    grad = torch.randn(x.shape, device=device, generator=gen).to(dtype)

    def forward() -> None:
        with torch.no_grad():
            fn(x, *LIF_ARGS)

    def forward_backward() -> None:
        x.grad = None
        fn(x, *LIF_ARGS).backward(grad)

    fwd = _timed(forward, device, iters)
    both = _timed(forward_backward, device, iters)
    moved = 6 * x.numel() * x.element_size()
    return {"device": device.type, "impl": impl, "dtype": str(dtype).removeprefix("torch."), "T": T,
            "elements": x.numel(), "fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3, "gbs": moved / both / 1e9}


def table(rows: list[dict], copy_gbs: dict[str, float]) -> str:
    lines = [
        "| device | impl | dtype | T | elements | fwd (ms) | fwd+bwd (ms) | speed-up vs reference | "
        "GB/s (6 tensors moved) | % of copy bandwidth |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = {(r["dtype"], r["T"]): r["fwd_bwd_ms"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        speedup = reference.get((r["dtype"], r["T"]), float("nan")) / r["fwd_bwd_ms"]
        share = f"{100 * r['gbs'] / copy_gbs[r['dtype']]:.0f}%" if r["dtype"] in copy_gbs else "-"
        lines.append(
            f"| {r['device']} | {r['impl']} | {r['dtype']} | {r['T']} | {r['elements'] / 2**20:.3g}M | "
            f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {speedup:.2f}x | {r['gbs']:.1f} | {share} |"
        )
    return "\n".join(lines)


def _size(text: str) -> int:
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--elements", type=_size, default=_size("64M"), help="input size, all steps (e.g. 64M)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fused = device.type == "cuda" and lif_triton.available()
    rows, copy_gbs = [], {}
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        if fused:
            copy_gbs[dtype_name] = copy_bandwidth_gbs(device, args.elements, dtype, args.iters)
        for T in args.T:
            rows.append(measure("reference", T, args.elements, dtype, device, args.iters))
            if fused:
                rows.append(measure("fused", T, args.elements, dtype, device, args.iters))
    print(table(rows, copy_gbs))
    if copy_gbs:
        print("copy bandwidth (GB/s): " + ", ".join(f"{k} {v:.0f}" for k, v in copy_gbs.items()))
    if not args.no_record:
        bandwidth = (f"copy bandwidth (GB/s): {', '.join(f'{k} {v:.0f}' for k, v in copy_gbs.items())}"
                     if copy_gbs else "fused path not run (no CUDA device)")
        record_section("LIF forward+backward: reference vs fused", "lif_speed.py",
                       ["Spikformer LIF (tau 2, V_th 1, hard reset 0, detached reset); mean of the timed calls "
                        f"after a warm-up; {bandwidth}"],
                       table(rows, copy_gbs), args.note, device.type)
    return rows


if __name__ == "__main__":
    main()
