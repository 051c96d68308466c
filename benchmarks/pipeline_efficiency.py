"""How much of its own model step a pretraining job delivers, and where the rest of its time goes.

    python benchmarks/pipeline_efficiency.py --variant spikformer_v2_tiny --img-size 32 --batch 32 \
        --workers 2 --decode cpu --steps 20 --warmup 10 --json out.json
        [--T 1] [--images N] [--log-every 10] [--knn-every 1000] [--compile] [--work DIR] [--threads N]
        [--record] [--note TEXT]

In one process, on one device:
1. synthetic JPEGs (ImageNet-like 300-500 px photos from benchmarks/data_throughput.py for --img-size
   >= 128, else class-coloured squares of --img-size from benchmarks/gpu_chain.py; at most 512 are
   drawn, the rest of a split are hard links to them: the same bytes to read and decode, without the
   drawing time), sharded by the project's writer (pipeline.data.writer.write_shards, in-process): a
   train split of --images images (default: enough that the run never starts a second epoch, so no
   DataLoader restart lands in the window) and a val split for the kNN monitor;
2. the plain step (benchmarks/gpu_step.py `measure`, mode pretrain: the same MaskedImageModel,
   batch and precision, a resident random batch, no DeepSpeed, no loader) for W + K steps;
3. per --decode mode, the real pretraining stage through the runner's local backend in this
   process (pipeline.runner.local_backend.run_local: a one-process group, DeepSpeed ZeRO-2, the shard
   loader with --workers DataLoader workers, an MLflow sqlite store in the work folder), for
   W + K + L optimizer steps (L = --log-every). Everything else is jobs/pretrain.yaml's: decoder,
   mask ratio, grad_clip, firing-rate / reconstruction / checkpoint cadences; the kNN monitor runs
   every --knn-every steps (pretrain.yaml leaves it off), at step 0 and at the end.
The window is the log intervals inside steps W+1 .. W+K (from the first log step at or after W to
the last at or before W+K: all of it when W and K are multiples of L); the stage's own
loop timer (pipeline.train.timers, logged as MLflow metrics `time/<section>` at log steps) gives the
breakdown there, and its run totals (`time_total/<section>`, `time_count/<section>` in the stage's
summary metrics) give the per-event costs of what the job does rarely: one checkpoint save, one kNN
evaluation, one firing-rate probe step, one reconstruction grid. Those are then amortised at the
job's cadence (a computed figure, labelled so). The last L steps absorb the end of the run (final
probe, kNN, save, export), outside the window.

The last line is `pipeline/plain R (pipeline X img/s, plain Y img/s)` for the best decode mode.
--json writes every figure; --record appends a dated section to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_step  # noqa: E402
from benchmarks.data_throughput import make_images  # noqa: E402
from benchmarks.gpu_chain import write_images  # noqa: E402

EXPERIMENT = "pipeline-efficiency"
UNIQUE_IMAGES = 512  # distinct JPEGs per split; the rest are hard links to them
CLASSES = 10
# the loop timer's sections in the window, in loop order (pipeline.train.trainer / engine)
SECTIONS = {
    "data_wait": "waiting for the loader's next batch (its device hand-off included)",
    "h2d": "batch to the engine's device and dtype",
    "forward_backward": "forward + backward (DeepSpeed)",
    "step_stats": "NaN guard / loss statistics (all-reduce, no host read)",
    "optimizer": "DeepSpeed optimizer step (clip, AdamW, ZeRO) + schedule",
    "log": "log steps: reading the step statistics, metrics to MLflow",
    "hooks": "stage hooks after each step (EMA, pictures)",
    "reconstruction": "reconstruction grids",
    "knn": "kNN monitor",
    "firing_rate": "firing-rate probe: reading the rates",
    "forward_backward_probe": "forward + backward with the firing-rate hooks",
    "checkpoint": "checkpoint save + report",
    "other": "wall not in any section (CPU only)",
    "device_unaccounted": "CUDA: wall minus the device sections' device time (device idle + kernels outside them)",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--img-size", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="micro-batch of the one process")
    parser.add_argument("--workers", type=int, required=True, help="DataLoader workers (data.loader_workers)")
    parser.add_argument("--decode", default="cpu", help="comma-separated decode modes: cpu, gpu")
    parser.add_argument("--steps", type=int, required=True, help="K: timed steps")
    parser.add_argument("--warmup", type=int, required=True, help="W: untimed steps first")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--T", type=int, default=1)
    parser.add_argument("--images", type=int, default=None, help="train images (default: one epoch > the run)")
    parser.add_argument("--val-images", type=int, default=None, help="val images for the kNN monitor")
    parser.add_argument("--log-every", type=int, default=10, help="L: loop.log_every_steps (the LoopSettings default)")
    parser.add_argument("--knn-every", type=int, default=1000, help="stages.pretrain.knn_every_steps")
    parser.add_argument("--knn-bank", type=int, default=None,
                        help="stages.pretrain.knn_bank_size (default: the job default, at most the train images)")
    parser.add_argument("--knn-eval", type=int, default=None,
                        help="stages.pretrain.knn_eval_size (default: the job default, at most the val images)")
    parser.add_argument("--compile", action="store_true", help="deepspeed.compile and a compiled plain step")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the training process")
    parser.add_argument("--record", action="store_true", help="append a section to docs/BENCHMARKS.md")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    args.decodes = [d.strip() for d in args.decode.split(",") if d.strip()]
    if not args.decodes or any(d not in ("cpu", "gpu") for d in args.decodes):
        parser.error(f"--decode: give cpu and/or gpu, comma-separated (got {args.decode!r})")
    if min(args.steps, args.warmup, args.log_every, args.batch, args.img_size) < 1 or args.workers < 0:
        parser.error("--steps, --warmup, --log-every, --batch and --img-size must be >= 1, --workers >= 0")
    start, end = window(args)
    if end - start < args.log_every:
        parser.error(f"steps {args.warmup + 1}-{args.warmup + args.steps} hold no whole log interval of "
                     f"--log-every {args.log_every} steps: raise --steps or lower --log-every")
    return args


def window(args: argparse.Namespace) -> tuple[int, int]:
    """(first, last) log step of the timed window: whole log intervals within steps W+1 .. W+K."""
    every = args.log_every
    return -(-args.warmup // every) * every, (args.warmup + args.steps) // every * every


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup + args.steps + args.log_every


# --------------------------------------------------------------------------- data


def write_data(args: argparse.Namespace, work: Path) -> dict[str, str]:
    from pipeline.data.writer import write_shards

    # one epoch longer than the run: no DataLoader restart (a new epoch) inside the window
    train = args.images or args.batch * (total_steps(args) + 2)
    val = args.val_images or max(4 * args.batch, 64)
    manifests = {}
    for split, count, seed in (("train", train, 0), ("val", val, 1)):
        root = work / "images" / split
        if not root.exists():
            unique = min(count, UNIQUE_IMAGES)
            if args.img_size >= 128:
                make_images(root, unique, seed=seed)  # 300-500 px photo-like JPEGs in 10 class folders
            else:
                write_images(work / "images", split, unique, CLASSES, args.img_size, seed)
            drawn = sorted(root.rglob("*.jpg"))
            for i in range(unique, count):  # the writer shuffles samples into shards: copies spread out
                source = drawn[i % unique]
                os.link(source, source.parent / f"copy_{i:07d}.jpg")
        report = write_shards("imagefolder", str(work / "shards"), split=split, root=str(root),
                              shard_max_count=max(64, count // 16), workers=0, progress=False)
        manifests[split] = report.manifest_url
    return manifests


# --------------------------------------------------------------------------- the plain step


def plain_step(args: argparse.Namespace, device: torch.device) -> dict:
    """benchmarks/gpu_step.py's pretraining step at this size (bf16 autocast on CUDA, fp32 on the CPU:
    what the engine's precision "auto" gives)."""
    options = argparse.Namespace(variant=args.variant, T=args.T, img=args.img_size, batch=args.batch,
                                 steps=args.steps, warmup=args.warmup,
                                 precision="bf16" if device.type == "cuda" else "fp32",
                                 compile=args.compile, compile_backend="inductor", profile_steps=0)
    cpu = time.process_time()
    row = gpu_step.measure("pretrain", options, device)
    # CPU seconds of this process per step (measure() runs W warm-up + K timed steps)
    row["cpu_s_per_step"] = (time.process_time() - cpu) / (args.warmup + args.steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- the pipeline


def job_spec(args: argparse.Namespace, manifests: dict[str, str], decode: str, work: Path, cuda: bool) -> dict:
    from pipeline.config import load_job

    reference = load_job(ROOT / "jobs" / "pretrain.yaml")  # the cadences and recipe of the real job
    stage = reference.stages.pretrain
    return {
        "name": f"pipeline-efficiency-{decode}",
        "output_root": str(work / f"out-{decode}"),
        "seed": 0,
        "data": {"pretrain": manifests["train"], "train": manifests["train"], "val": manifests["val"],
                 "loader_workers": args.workers, "decode": decode},
        "model": {"variant": args.variant, "img_size": args.img_size, "num_classes": CLASSES},
        "deepspeed": {"zero_stage": reference.deepspeed.zero_stage, "precision": "auto",
                      "grad_clip": reference.deepspeed.grad_clip, "compile": args.compile},
        "stages": {
            "pretrain": {
                "max_steps": total_steps(args), "batch_size": args.batch, "T": args.T,
                "log_every_steps": args.log_every, "knn_every_steps": args.knn_every,
                **({"knn_bank_size": args.knn_bank} if args.knn_bank else {}),
                **({"knn_eval_size": args.knn_eval} if args.knn_eval else {}),
                "mask_ratio": stage.mask_ratio, "decoder_dim": stage.decoder_dim, "decoder_depth": stage.decoder_depth,
                "decoder_heads": stage.decoder_heads, "norm_pix_loss": stage.norm_pix_loss,
                "optimizer": stage.optimizer.model_dump(mode="json"), "augment": stage.augment.model_dump(mode="json"),
                "firing_rate_every_steps": stage.firing_rate_every_steps,
                "reconstruction_every_steps": stage.reconstruction_every_steps,
                "checkpoint": stage.checkpoint.model_dump(mode="json"),
            },
            "finetune": {"enabled": False},
            "evaluate": {"enabled": False},
        },
        "scaling": {"num_workers": 1, "use_gpu": cuda},
        "mlflow": {"tracking_uri": f"sqlite:///{work / f'mlflow-{decode}.db'}", "experiment": EXPERIMENT},
    }


def run_pipeline(args: argparse.Namespace, manifests: dict[str, str], decode: str, work: Path,
                 device: torch.device) -> dict:
    from mlflow.tracking import MlflowClient

    from pipeline.config import JobConfig
    from pipeline.runner.local_backend import run_local

    spec = job_spec(args, manifests, decode, work, device.type == "cuda")
    job = JobConfig.model_validate(spec)
    started = time.perf_counter()
    run_local(job, ["pretrain"])
    wall = time.perf_counter() - started

    client = MlflowClient(spec["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'pretrain'")
    if not runs or runs[0].info.status != "FINISHED":
        raise RuntimeError(f"decode {decode}: no FINISHED pretrain run in {spec['mlflow']['tracking_uri']}")
    run = runs[0]
    first, last = window(args)
    logged = range(first + args.log_every, last + 1, args.log_every)  # intervals ending at these steps

    def per_step(key: str) -> float | None:
        """Mean of a per-interval metric over the window's log intervals (all L steps long)."""
        values = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        picked = [values[s] for s in logged if s in values]
        return sum(picked) / len(picked) if len(picked) == len(logged) else None

    keys = {m for m in run.data.metrics if m.startswith("time/")}
    sections = {key.removeprefix("time/"): per_step(key) for key in sorted(keys)}
    seconds_per_step = sections.pop("wall")
    cpu_per_step = sections.pop("process_cpu", None)
    totals = {key.removeprefix("time_total/"): value for key, value in run.data.metrics.items()
              if key.startswith("time_total/")}
    counts = {key.removeprefix("time_count/"): int(value) for key, value in run.data.metrics.items()
              if key.startswith("time_count/")}
    return {"decode": decode, "wall_s": wall, "run_id": run.info.run_id, "spec": spec, "window": [first + 1, last],
            "images_per_s": args.batch / seconds_per_step, "s_per_step": seconds_per_step,
            "cpu_s_per_step": cpu_per_step,
            "sections": {k: v for k, v in sections.items() if v is not None},
            "totals": totals, "counts": counts,
            "cadence": {"checkpoint": spec["stages"]["pretrain"]["checkpoint"]["every_steps"],
                        "knn": args.knn_every,
                        "firing_rate": spec["stages"]["pretrain"]["firing_rate_every_steps"],
                        "reconstruction": spec["stages"]["pretrain"]["reconstruction_every_steps"]}}


def per_event(result: dict) -> dict[str, dict[str, float]]:
    """Seconds of one occurrence of each rare event and the same amortised per step at the job's cadence."""
    totals, counts, cadence = result["totals"], result["counts"], result["cadence"]

    def mean(name: str) -> float | None:
        return totals[name] / counts[name] if counts.get(name) else None

    events = {}
    for name in ("checkpoint", "knn", "reconstruction"):
        once = mean(name)
        if once is not None:
            events[name] = {"seconds": once, "count": counts[name], "every": cadence[name],
                            "amortised_s_per_step": once / cadence[name]}
    probe, plain = mean("forward_backward_probe"), mean("forward_backward")
    if probe is not None and plain is not None:
        once = max(probe - plain, 0.0) + (mean("firing_rate") or 0.0)
        events["firing_rate"] = {"seconds": once, "count": counts["forward_backward_probe"],
                                 "every": cadence["firing_rate"],
                                 "amortised_s_per_step": once / cadence["firing_rate"]}
    return events


# --------------------------------------------------------------------------- report


def breakdown_table(result: dict, plain: dict) -> str:
    step = result["s_per_step"]
    plain_step_s = plain["s_per_step"]
    lines = ["| part | s/step | share of the pipeline step | what |", "|---|---:|---:|---|"]
    for name, what in SECTIONS.items():
        if name in result["sections"]:
            seconds = result["sections"][name]
            lines.append(f"| {name} | {seconds:.4f} | {100 * seconds / step:.1f}% | {what} |")
    lines.append(f"| **pipeline step** (wall) | {step:.4f} | 100% | {result['images_per_s']:.1f} img/s |")
    lines.append(f"| plain step (gpu_step.py) | {plain_step_s:.4f} | {100 * plain_step_s / step:.1f}% | "
                 f"{plain['images_per_s']:.1f} img/s |")
    lines.append(f"| pipeline - plain | {step - plain_step_s:.4f} | {100 * (step - plain_step_s) / step:.1f}% | "
                 "the pipeline's extra time |")
    events = per_event(result)
    if events:
        lines += ["", "| rare event (outside the window) | seconds once | every (steps) | amortised s/step "
                  "(computed) |", "|---|---:|---:|---:|"]
        for name, event in events.items():
            lines.append(f"| {name} | {event['seconds']:.3f} | {event['every']} | "
                         f"{event['amortised_s_per_step']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if "gpu" in args.decodes and not cuda:
        raise SystemExit("pipeline_efficiency: --decode gpu needs a CUDA device")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    work = args.work or Path(__import__("tempfile").mkdtemp(prefix="pipeline_efficiency-"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch_extensions"))

    result: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                    "cpus": len(os.sched_getaffinity(0)), "pipeline": []}
    started = time.perf_counter()
    manifests = write_data(args, work)
    result["data_s"] = time.perf_counter() - started
    result["plain"] = plain_step(args, device)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    for decode in args.decodes:
        outcome = run_pipeline(args, manifests, decode, work, device)
        outcome["ratio"] = outcome["images_per_s"] / result["plain"]["images_per_s"]
        outcome["events"] = per_event(outcome)
        amortised = outcome["s_per_step"] + sum(e["amortised_s_per_step"] for e in outcome["events"].values())
        outcome["amortised_images_per_s"] = args.batch / amortised
        result["pipeline"].append(outcome)
        args.json.write_text(json.dumps(result, indent=1, default=str))  # a later timeout keeps this mode

    plain_ips = result["plain"]["images_per_s"]
    for outcome in result["pipeline"]:
        print(f"\n### decode {outcome['decode']}: {args.variant}, T {args.T}, {args.img_size} px, batch "
              f"{args.batch}, {args.workers} workers, window steps {outcome['window'][0]}-{outcome['window'][1]}")
        print(breakdown_table(outcome, result["plain"]))
        print(f"with the rare events amortised at the job's cadence (computed): "
              f"{outcome['amortised_images_per_s']:.1f} img/s, "
              f"{outcome['amortised_images_per_s'] / plain_ips:.3f} of plain")
        if not cuda and outcome["cpu_s_per_step"]:  # shared cores move wall time; CPU time much less
            print(f"CPU time of the training process: plain/pipeline "
                  f"{result['plain']['cpu_s_per_step'] / outcome['cpu_s_per_step']:.3f} (pipeline "
                  f"{outcome['cpu_s_per_step']:.3f} CPU-s/step, plain {result['plain']['cpu_s_per_step']:.3f})")
        print(f"decode {outcome['decode']}: pipeline/plain {outcome['ratio']:.3f} "
              f"(pipeline {outcome['images_per_s']:.1f} img/s, plain {plain_ips:.1f} img/s)")
    if args.record:
        record(args, result)
    best = max(result["pipeline"], key=lambda o: o["ratio"])
    if not all(math.isfinite(o["ratio"]) for o in result["pipeline"]):
        raise SystemExit("pipeline_efficiency: a non-finite ratio")
    print(f"pipeline/plain {best['ratio']:.3f} (pipeline {best['images_per_s']:.1f} img/s, "
          f"plain {plain_ips:.1f} img/s)")
    return result


def record(args: argparse.Namespace, result: dict) -> None:
    from benchmarks._report import record_section

    device = "cuda" if result["device"] != "cpu" else "cpu"
    for outcome in result["pipeline"]:
        record_section(
            f"Pipeline efficiency: {args.variant}, decode {outcome['decode']}", "pipeline_efficiency.py",
            [f"pipeline/plain {outcome['ratio']:.3f} (pipeline {outcome['images_per_s']:.1f} img/s, plain "
             f"{result['plain']['images_per_s']:.1f} img/s); amortised rare events (computed): "
             f"{outcome['amortised_images_per_s']:.1f} img/s",
             "sections: the stage's loop timer (`time/<section>` MLflow metrics) over the window's log intervals"],
            breakdown_table(outcome, result["plain"]), args.note, device)


if __name__ == "__main__":
    main()
