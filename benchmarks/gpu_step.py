"""One plain PyTorch training step of a Spikformer variant, eager or compiled: images/s, MFU, peak memory.

    python benchmarks/gpu_step.py VARIANT [--mode pretrain finetune] [--T 1] [--img 224] [--batch 64 128 256]
        [--steps 10] [--warmup 3] [--precision bf16] [--compile] [--profile-steps 3] [--budget-s S]
        [--device cuda] [--json FILE]

No pipeline, no DeepSpeed: the model's own speed. pretrain = `models.mim.MaskedImageModel` around
`timm.create_model(VARIANT, num_classes=0)` (decoder 256 x 4, mask ratio 0.6: the job defaults), loss =
its masked-patch MSE; finetune = `timm.create_model(VARIANT, num_classes=1000, drop_path_rate=0.1)`
with cross-entropy. One step = forward under autocast (bf16) or fp32, backward, AdamW step (fused on
CUDA), on one resident random batch: nothing reads the host until the timed steps end. --compile
compiles the module in place (Inductor); the first warm-up step's time, compilation included, is kept,
with dynamo's counts for the run: graphs, graph breaks, recompilations (a compile of a frame already
compiled once).

Several --batch values sweep the batch, batch by batch (every mode at the first batch, then the next),
and the result names the best batch per mode (images/s); a batch that runs out of device memory is
recorded as such. --budget-s stops the sweep before a run that would not fit in what is left (its
estimate: the longest run so far). --profile-steps N profiles N more steps of each run (torch.profiler)
and keeps the 15 kernels with the most device time (CPU ops on a CPU run), with their share.

Model FLOPs per image = 3 (forward + backward) x 2 (FLOPs per MAC) x MACs, MACs counted by
`models.count_flops` on the very module timed (times T for the encoder) plus, for pretraining, the
decoder's softmax-attention products (2 L^2 D per block, no Linear so not in that count): the rule of
pipeline/costplan.py. MFU = model FLOP/s over a square-matmul rate measured on the same device (bf16
8192^3 on CUDA; the run's dtype at 1024^3 on CPU), not the datasheet peak. Peak memory:
torch.cuda.max_memory_allocated over warm-up and timed steps (the process's peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch._dynamo.callback import on_compile_start
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401  (registers the Spikformer variants with timm)
from models import count_flops  # noqa: E402
from models.mim import MaskedImageModel  # noqa: E402

NUM_CLASSES = 1000
TOP_KERNELS = 15
_COMPILE_IDS: list[str] = []  # dynamo's "frame/compile" id of every compilation since the last reset


def resolve_device(name: str, current_cuda: Callable[[], int] | None = None) -> torch.device:
    """``name`` as a torch.device; "cuda" gets the current device's index (torch 2.11's
    ``torch.cuda.set_device`` refuses a device without one)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", (current_cuda or torch.cuda.current_device)())
    return device


def dynamo_counts() -> dict:
    """Graphs, graph breaks and recompilations since the last ``torch._dynamo.reset()``."""
    recompiles = sum(1 for cid in _COMPILE_IDS if cid.split("/")[1:2] not in ([], ["0"]))
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "frames_compiled": counters["frames"]["total"], "recompiles": recompiles,
            "break_reasons": sorted({r.splitlines()[0][:200] for r in counters["graph_break"]})}


def _record_compile(args) -> None:
    _COMPILE_IDS.append(str(args.compile_id))


def reset_dynamo() -> None:
    """Forget every compilation, then record the id of each new one (reset drops dynamo's callbacks)."""
    torch._dynamo.reset()
    counters.clear()
    _COMPILE_IDS.clear()
    on_compile_start(_record_compile)


def top_kernels(prof, device: torch.device, steps: int, count: int = TOP_KERNELS) -> list[dict]:
    """The ``count`` kernels (CPU ops on a CPU) with the most self time in a profile of ``steps`` steps."""
    events = prof.key_averages()
    if device.type == "cuda":
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]

        def spent(e):
            return getattr(e, "self_device_time_total", 0)
    else:
        def spent(e):
            return e.self_cpu_time_total
    total = sum(spent(e) for e in events) or 1.0
    ranked = sorted((e for e in events if spent(e) > 0), key=spent, reverse=True)[:count]
    return [{"name": e.key[:160], "ms_per_step": spent(e) / 1e3 / steps, "share": spent(e) / total,
             "calls_per_step": e.count / steps} for e in ranked]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, iters: int = 10) -> float:
    """Measured square-matmul rate in TFLOP/s: the MFU denominator."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def build(mode: str, variant: str, T: int | None, img: int | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module to train, its Spikformer encoder)."""
    kwargs = {k: v for k, v in (("T", T), ("img_size", img)) if v is not None}
    if mode == "pretrain":
        encoder = timm.create_model(variant, num_classes=0, **kwargs)
        return MaskedImageModel(encoder), encoder
    net = timm.create_model(variant, num_classes=NUM_CLASSES, drop_path_rate=0.1, **kwargs)
    return net, net


def macs_per_image(net: torch.nn.Module, encoder: torch.nn.Module) -> int:
    """Dense multiply-accumulates of one forward of one image, all T steps."""
    counts = count_flops(net, encoder.img_size)
    if net is encoder:
        return encoder.T * sum(counts.values())
    encoder_macs = sum(v for k, v in counts.items() if k.startswith("encoder."))
    decoder_macs = sum(v for k, v in counts.items() if not k.startswith("encoder."))
    attention = len(net.decoder_blocks) * 2 * net.num_patches**2 * net.decoder_embed.out_features
    return encoder.T * encoder_macs + decoder_macs + attention


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    reset_dynamo()  # per run: its own compilation and counts
    net, encoder = build(mode, args.variant, args.T, args.img)
    macs = macs_per_image(net, encoder)  # before compiling: the counting forward must not trigger it
    net.to(device).train()
    if args.compile:
        net.compile(dynamic=False, backend=args.compile_backend)  # in place: parameter names unchanged
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=device.type == "cuda")
    size = encoder.img_size
    images = torch.randn(args.batch, encoder.in_chans, size, size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    bf16 = args.precision == "bf16"

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if mode == "pretrain":
                loss = net(images)[0]
            else:
                loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()
    sync(device)
    first_step_s = time.perf_counter() - start  # compilation included when --compile
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - start
    images_per_s = args.batch * args.steps / seconds
    flops_per_image = 6 * macs
    row = {
        "mode": mode, "variant": args.variant, "T": encoder.T, "img": size, "batch": args.batch,
        "precision": args.precision, "compiled": args.compile_backend if args.compile else "no",
        "device": device.type,
        "params_m": sum(p.numel() for p in params) / 1e6,
        "first_step_s": first_step_s, "s_per_step": seconds / args.steps, "images_per_s": images_per_s,
        "gflops_per_image": flops_per_image / 1e9, "tflops": images_per_s * flops_per_image / 1e12,
        "peak_mib": peak_mib(device), "final_loss": float(loss),
    }
    if args.compile:
        row["dynamo"] = dynamo_counts()
    profile_steps = getattr(args, "profile_steps", 0)
    if profile_steps:  # after the timed steps: the profiler's overhead stays out of the figures above
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(profile_steps):
                step()
            sync(device)
        row["profile"] = top_kernels(prof, device, profile_steps)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| mode | variant | T | img | batch | precision | compiled | first step (s) | s/step | images/s | "
             "model GFLOPs/image | model TFLOP/s | MFU | peak memory (MiB) |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['variant']} | {r['T']} | {r['img']} | {r['batch']} | {r['precision']} | "
                     f"{r['compiled']} | {r['first_step_s']:.1f} | {r['s_per_step']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['gflops_per_image']:.2f} | {r['tflops']:.2f} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def best_per_mode(rows: list[dict]) -> dict[str, dict]:
    """mode -> its fastest measured row's batch, images/s and MFU."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["mode"] not in best or r["images_per_s"] > best[r["mode"]]["images_per_s"]:
            best[r["mode"]] = {"batch": r["batch"], "images_per_s": r["images_per_s"], "mfu": r.get("mfu")}
    return best


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=models.list_models(), metavar="VARIANT")
    parser.add_argument("--mode", nargs="+", choices=["pretrain", "finetune"], default=["pretrain", "finetune"])
    parser.add_argument("--T", type=int, default=None, help="time steps (default: the variant's)")
    parser.add_argument("--img", type=int, default=None, help="image size (default: the variant's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[64], help="one or more batch sizes (a sweep)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first one included (>= 1)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the module")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend [inductor]; aot_eager checks tracing without code generation")
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many more steps of each run")
    parser.add_argument("--budget-s", type=float, default=None, help="skip runs that would end past this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or min(args.batch) < 1 or args.profile_steps < 0:
        parser.error("--warmup, --steps and --batch must be >= 1, --profile-steps >= 0")
    began = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    peak = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" or args.precision == "bf16"
                         else torch.float32)
    rows: list[dict] = []
    skipped: list[dict] = []
    result = {"matmul_tflops": peak, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "modes": args.mode, "batches": args.batch, "rows": rows,
              "skipped": skipped, "best": {}}
    longest = 0.0
    for batch in args.batch:
        for mode in args.mode:
            left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - began)
            if left is not None and longest and longest > left:  # the first run always runs
                skipped.append({"mode": mode, "batch": batch, "why": f"time: {left:.0f} s left, a run took "
                                f"{longest:.0f} s"})
                print(f"gpu_step: {mode} at batch {batch} skipped ({skipped[-1]['why']})")
                continue
            run_began = time.perf_counter()
            try:
                row = measure(mode, argparse.Namespace(**{**vars(args), "batch": batch}), device)
            except RuntimeError as exc:
                if not _out_of_memory(exc):
                    raise
                skipped.append({"mode": mode, "batch": batch, "why": "out of memory"})
                print(f"gpu_step: {mode} at batch {batch} ran out of memory")
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row["run_s"] = time.perf_counter() - run_began  # compilation and profile included
            longest = max(longest, row["run_s"])
            row["mfu"] = row["tflops"] / peak
            rows.append(row)
            result["best"] = best_per_mode(rows)
            if "dynamo" in row:
                d = row["dynamo"]
                print(f"gpu_step: {mode} batch {batch}: dynamo {d['graphs']} graphs, {d['graph_breaks']} graph breaks, "
                      f"{d['recompiles']} recompiles")
            if args.json:  # after each run: a later timeout keeps what was measured
                args.json.write_text(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(table(rows))
    print(f"MFU against a measured {peak:.1f} TFLOP/s square matmul")
    for mode, best in result["best"].items():
        print(f"best {mode}: batch {best['batch']}, {best['images_per_s']:.1f} images/s, MFU {100 * best['mfu']:.1f}%")
    for r in rows:
        if result["best"][r["mode"]]["batch"] != r["batch"]:
            continue  # the best run's profile only: the log stays short
        for k in r.get("profile", []):
            print(f"profile {r['mode']} batch {r['batch']}: {100 * k['share']:5.1f}% {k['ms_per_step']:8.3f} ms "
                  f"{k['name'][:100]}")
    bad = [r["mode"] for r in rows if not math.isfinite(r["final_loss"])]
    if bad:
        raise SystemExit(f"gpu_step: non-finite loss in {', '.join(bad)}")
    if not rows:
        raise SystemExit("gpu_step: nothing measured")
    return result


if __name__ == "__main__":
    main()
