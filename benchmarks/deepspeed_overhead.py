"""What DeepSpeed adds to the plain step at world size 1, and what its config can take away.

    python benchmarks/deepspeed_overhead.py [--variant spikformer_v2_tiny] [--img 32] [--batch 32] [--T 1]
        [--steps 6] [--warmup 2] [--threads 1] [--repeats 2] [--json FILE]

One process, one resident random batch, the pretraining model of jobs/pretrain.yaml (MaskedImageModel,
decoder 256 x 4, mask 0.6). Rows: gpu_step.py's plain step (torch AdamW, no DeepSpeed), then
`TrainEngine.train_step` (pipeline.train.engine.build_engine) under ZeRO 0, 1 and 2 with the engine's
config, ZeRO-2 with gradient clipping (jobs/pretrain.yaml's grad_clip 3.0), and ZeRO-2 with
`zero_optimization.contiguous_gradients: false` (config_overrides). Precision: the engine's "auto"
(fp32 on the CPU, bf16 on CUDA; the plain step autocasts to bf16 on CUDA). CPU seconds per step of
this process are reported beside wall seconds: other jobs on shared cores move the wall time, not
the CPU time of a single-threaded run. Each row is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_step  # noqa: E402
from benchmarks.train_step import PRETRAIN_MIM, build  # noqa: E402

VARIANTS = {  # name -> DeepSpeedSettings fields
    "ZeRO-0": {"zero_stage": 0},
    "ZeRO-1": {"zero_stage": 1},
    "ZeRO-2 (engine default config)": {"zero_stage": 2},
    "ZeRO-2 + grad_clip 3.0": {"zero_stage": 2, "grad_clip": 3.0},
    "ZeRO-2, contiguous_gradients off": {"zero_stage": 2,
                                         "config_overrides": {"zero_optimization": {"contiguous_gradients": False}}},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_step(args: argparse.Namespace, settings: dict, device: torch.device) -> dict:
    from pipeline.config import DeepSpeedSettings, LoopSettings, OptimizerSettings
    from pipeline.stages.pretrain import mim_loss
    from pipeline.train.engine import build_engine

    torch.manual_seed(0)
    net, encoder = build("pretrain", args.variant, args.T, args.img)
    loop = LoopSettings(batch_size=args.batch, max_steps=10**6, T=encoder.T, log_every_steps=10**6,
                        firing_rate_every_steps=10**6)
    engine = build_engine(net.to(device), DeepSpeedSettings(**settings), OptimizerSettings(warmup_epochs=0), loop,
                          loss_fn=mim_loss, steps_per_epoch=10**6, firing_rate_fn=None)
    batch = (torch.randn(args.batch, 3, encoder.img_size, encoder.img_size, device=device),
             torch.zeros(args.batch, dtype=torch.long, device=device))
    for _ in range(args.warmup):
        engine.train_step([batch])
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        engine.train_step([batch])
    _sync(device)
    return {"s_per_step": (time.perf_counter() - start) / args.steps,
            "cpu_s_per_step": (time.process_time() - cpu) / args.steps}


def plain(args: argparse.Namespace, device: torch.device) -> dict:
    options = argparse.Namespace(variant=args.variant, T=args.T, img=args.img, batch=args.batch, steps=args.steps,
                                 warmup=args.warmup, precision="bf16" if device.type == "cuda" else "fp32",
                                 compile=False, compile_backend="inductor")
    cpu = time.process_time()
    row = gpu_step.measure("pretrain", options, device)
    # measure() times warm-up and timed steps together on the CPU clock: share it out per step
    return {"s_per_step": row["s_per_step"], "cpu_s_per_step": (time.process_time() - cpu) / (args.steps + args.warmup)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="spikformer_v2_tiny")
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--T", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert PRETRAIN_MIM["decoder_dim"] == 256 and PRETRAIN_MIM["mask_ratio"] == 0.6  # gpu_step's MIM defaults too
    rows = []
    measures = [("plain step (gpu_step.py)", lambda: plain(args, device))]
    measures += [(name, lambda s=settings: engine_step(args, s, device)) for name, settings in VARIANTS.items()]
    for name, measure in measures:
        runs = [measure() for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["cpu_s_per_step"])
        rows.append({"row": name, **best})
        print(f"{name}: {best['s_per_step']:.3f} s/step, {best['cpu_s_per_step']:.3f} CPU-s/step", flush=True)
    base = rows[0]["cpu_s_per_step"]
    print("\n| step | s/step | CPU-s/step | x plain (CPU) |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['row']} | {row['s_per_step']:.3f} | {row['cpu_s_per_step']:.3f} | "
              f"{row['cpu_s_per_step'] / base:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
