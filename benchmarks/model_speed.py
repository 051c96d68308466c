"""Forward+backward throughput and peak memory of Spikformer variants.

    python benchmarks/model_speed.py VARIANT [--T 4] [--img 224] [--batch 8]
        [--steps 5] [--warmup 1] [--device cpu] [--compile] [--fused] [--no-record]

--T and --img default to each variant's own defaults. Prints a Markdown table and appends a dated
section (hardware, exact command, table) to docs/BENCHMARKS.md unless --no-record.
CPU peak memory is the process's peak RSS (it includes the Python/torch runtime); CUDA peak memory is
torch.cuda.max_memory_allocated. One variant per run, so the process peak belongs to it.
--compile runs the model through torch.compile (Inductor; the warm-up steps include the compile time).
--fused uses the fused Triton LIF (CUDA only); without it every neuron runs the PyTorch reference.
images/CPU-s divides by the process CPU time (all threads): on a machine shared with other jobs it
is the steadier number; with N threads it is about images/s / N when the threads are busy.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from benchmarks._report import record_section  # noqa: E402


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(
    name: str,
    T: int | None,
    img: int | None,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    compile: bool = False,
    fused: bool = False,
) -> dict:
    overrides = {k: v for k, v in (("T", T), ("img_size", img)) if v is not None}
    lif_backend = "triton" if fused else "torch"
    model = models.create(name, lif_kwargs={"backend": lif_backend}, **overrides).to(device).train()
    if compile:
        model.compile(dynamic=False)
    size = model.img_size
    images = torch.randn(batch, model.in_chans, size, size, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "variant": name,
        "path": f"{'compiled' if compile else 'eager'}, {'fused' if fused else 'torch'} LIF",
        "T": model.T,
        "img": size,
        "batch": batch,
        "steps": steps,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "images_per_s": batch * steps / seconds,
        "s_per_step": seconds / steps,
        "images_per_cpu_s": batch * steps / cpu_seconds,
        "peak_mib": peak_memory_mib(device),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | path | params (M) | T | img | batch | steps | s/step | images/s | images/CPU-s "
        "| peak memory (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['path']} | {r['params_m']:.2f} | {r['T']} | {r['img']} | {r['batch']} | "
            f"{r['steps']} | "
            f"{r['s_per_step']:.3f} | {r['images_per_s']:.2f} | {r['images_per_cpu_s']:.2f} | {r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def record(rows: list[dict], device: torch.device, note: str) -> None:
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    record_section(f"Model speed: {', '.join(r['variant'] for r in rows)}", "model_speed.py",
                   [f"forward + backward (cross-entropy on random labels), train mode; peak memory: {memory}; "
                    "images/CPU-s: per second of process CPU time (all threads)"],
                   table(rows), note, device.type)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=models.list_models(), metavar="VARIANT")
    parser.add_argument("--T", type=int, default=None, help="time steps (default: the variant's)")
    parser.add_argument("--img", type=int, default=None, help="image size (default: the variant's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (Inductor)")
    parser.add_argument("--fused", action="store_true", help="fused Triton LIF kernels (CUDA only)")
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.fused and device.type != "cuda":
        parser.error("--fused needs a CUDA device (Triton kernels)")
    rows = [
        measure(args.variant, args.T, args.img, args.batch, args.steps, args.warmup, device, args.compile, args.fused)
    ]
    print(table(rows))
    if not args.no_record:
        record(rows, device, args.note)


if __name__ == "__main__":
    main()
