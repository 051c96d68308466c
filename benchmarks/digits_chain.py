"""The full pretrain -> finetune -> evaluate chain on digits with spikformer_v2_tiny, and "does SSL help".

    python benchmarks/digits_chain.py [--out DIR] [--no-ssl-comparison] [--note TEXT] [--no-record]

1. digits shards (train 1437 / val 360, 32 px) are written once into {out}/shards;
2. chain: one `torchrun --nproc_per_node 2 -m pipeline.launch_local` launch runs the three stages
   with RECIPE (CPU, gloo, DeepSpeed ZeRO-2, fp32); wall time counts everything from the launch
   (process start, imports, shards excluded) to the evaluate result;
3. SSL vs scratch: finetune + evaluate from scratch with all labels; then, per seed, on a
   class-balanced LABEL_FRACTION of the train labels (the seed picks the subset, the head init and the
   data order), once from the chain's pretrained encoder and once from scratch, with the same recipe
   and the same number of optimizer steps.
Prints a table and appends a dated "Digits chain" section to docs/BENCHMARKS.md (unless --no-record).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._report import append_section, hardware  # noqa: E402

# The recipe the chain runs (and the one suggested for jobs/quickstart.yaml).
RECIPE: dict[str, Any] = {
    "model": {"variant": "spikformer_v2_tiny", "img_size": 32, "num_classes": 10},
    "deepspeed": {"zero_stage": 2, "precision": "auto"},
    "data": {"loader_workers": 0},
    "stages": {
        "pretrain": {
            "epochs": 30, "batch_size": 32, "T": 1, "mask_ratio": 0.5,
            "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4,
            "optimizer": {"base_lr": 6.0e-3, "warmup_epochs": 1},
            "augment": {"scale": [0.6, 1.0], "hflip": 0.0},
            "log_every_steps": 23, "firing_rate_every_steps": 115, "reconstruction_every_steps": 230,
            "checkpoint": {"every_steps": 200},
        },
        "finetune": {
            "epochs": 25, "batch_size": 32, "T": 1, "drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0,
            "label_smoothing": 0.1,
            "optimizer": {"base_lr": 1.6e-2, "warmup_epochs": 1, "layer_decay": None},
            "augment": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "auto_augment": None,
                        "re_prob": 0.0},
            "log_every_steps": 23, "checkpoint": {"every_steps": 200},
        },
        "evaluate": {"batch_size": 128, "energy_batches": 2},
    },
}
LABEL_FRACTION = 0.1
FRACTION_STEPS = 200  # optimizer steps of each few-label finetune (same for both inits)


def make_shards(dest: Path) -> dict[str, str]:
    from pipeline.data.writer import write_shards

    return {split: write_shards("digits", str(dest), split=split, shard_max_count=200, workers=0,
                                progress=False).manifest_url for split in ("train", "val")}


def run_stages(job: dict[str, Any], out: Path, stages: str, overrides: list[str] = ()) -> float:
    """One torchrun launch with 2 CPU ranks; returns its wall time in seconds."""
    out.mkdir(parents=True, exist_ok=True)
    job = {**job, "output_root": str(out / "outputs"), "mlflow": {"tracking_uri": f"sqlite:///{out}/mlflow.db",
                                                                   "experiment": "digits-chain"}}
    (out / "job.yaml").write_text(json.dumps(job, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", "--master_port=29561", "-m", "pipeline.launch_local",
           str(out / "job.yaml"), "--stages", stages]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with open(out / "run.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{stages} failed (rc {proc.returncode}); see {out / 'run.log'}")
    return wall


def result(out: Path, stage: str) -> dict[str, Any]:
    """The newest FINISHED run of `stage` in the launch's MLflow store: export URL and metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("digits-chain").experiment_id
    run = client.search_runs([experiment], f"tags.`pipeline.stage` = '{stage}' and attributes.status = 'FINISHED'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    return {"export_url": run.data.tags.get("pipeline.export_url"), "metrics": run.data.metrics}


def row(name: str, folder: Path, wall: float) -> dict[str, Any]:
    f_m, e_m = result(folder, "finetune")["metrics"], result(folder, "evaluate")["metrics"]
    return {"run": name, "top1": e_m["top1"], "top5": e_m["top5"], "n": e_m["n_samples"], "pretrain_s": None,
            "finetune_s": f_m["train_seconds"], "wall_s": wall, "steps": str(int(f_m["steps"])),
            "pj": e_m["energy_pj_per_image"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bench_digits_chain", help="working folder")
    parser.add_argument("--no-ssl-comparison", action="store_true")
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[0, 1, 2],
                        help="seeds of the few-label comparison (subset, init, data order), e.g. 0,1,2")
    parser.add_argument("--note", default="")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    load_start = os.getloadavg()

    shards = make_shards(out / "shards")
    job = copy.deepcopy(RECIPE)
    job.update(name="digits-chain", seed=0)
    job["data"].update(train=shards["train"], val=shards["val"])

    chain = out / "chain"
    wall = run_stages(job, chain, "pretrain,finetune,evaluate")
    pre, fin, ev = (result(chain, s)["metrics"] for s in ("pretrain", "finetune", "evaluate"))
    rows = [{"run": "chain: 100% labels, SSL init", "top1": ev["top1"], "top5": ev["top5"], "n": ev["n_samples"],
             "pretrain_s": pre["train_seconds"], "finetune_s": fin["train_seconds"], "wall_s": wall,
             "steps": f"{int(pre['steps'])} + {int(fin['steps'])}", "pj": ev["energy_pj_per_image"]}]
    summary = [f"- chain wall time {wall:.0f} s (target: under 600 s); top-1 {ev['top1']:.2%} (target: >= 90%)"]

    if not args.no_ssl_comparison:
        scratch = out / "labels100_scratch"
        wall = run_stages(job, scratch, "finetune,evaluate", ["stages.finetune.init=scratch"])
        rows.append(row("100% labels, scratch", scratch, wall))
        encoder = result(chain, "pretrain")["export_url"]
        for seed in args.seeds:
            for name, init, tag in (("SSL init", encoder, "ssl"), ("scratch", "scratch", "scratch")):
                folder = out / f"labels{int(LABEL_FRACTION * 100)}_{tag}_seed{seed}"
                wall = run_stages(job, folder, "finetune,evaluate", [
                    f"seed={seed}", f"stages.finetune.init={init}", f"stages.finetune.label_fraction={LABEL_FRACTION}",
                    f"stages.finetune.max_steps={FRACTION_STEPS}", "stages.finetune.epochs=1000",
                ])
                rows.append(row(f"{LABEL_FRACTION:.0%} labels, {name}, seed {seed}", folder, wall))
        for name in ("SSL init", "scratch"):
            top1 = [r["top1"] for r in rows if r["run"].startswith(f"{LABEL_FRACTION:.0%} labels, {name},")]
            mean = statistics.fmean(top1)
            spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
            summary.append(f"- {LABEL_FRACTION:.0%} labels, {name}: top-1 {mean:.2%} +- {spread:.2%} "
                           f"(mean +- std over seeds {', '.join(map(str, args.seeds))})")

    table = [
        "| run | top-1 | top-5 | val images | optimizer steps | pretrain (s) | finetune (s) | launch wall (s) "
        "| energy (uJ/image) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        pretrain = "" if r["pretrain_s"] is None else f"{r['pretrain_s']:.0f}"
        table.append(f"| {r['run']} | {r['top1']:.2%} | {r['top5']:.2%} | {int(r['n'])} | {r['steps']} | {pretrain} "
                     f"| {r['finetune_s']:.0f} | {r['wall_s']:.0f} | {r['pj'] / 1e6:.2f} |")
    print("\n".join(table + [""] + summary))
    if not args.no_record:
        record(table + [""] + summary, args, load_start, os.getloadavg())
    return 0


def record(table: list[str], args: argparse.Namespace, load_start, load_end) -> None:
    command = "python benchmarks/digits_chain.py " + shlex.join(sys.argv[1:])
    stages = RECIPE["stages"]
    section = [
        f"\n## Digits chain ({dt.date.today().isoformat()})\n",
        f"- hardware: {hardware()}; load average {' '.join(f'{x:.1f}' for x in load_start)} at the start, "
        f"{' '.join(f'{x:.1f}' for x in load_end)} at the end",
        f"- command: `{command}`",
        "- 2 ranks (`torchrun --nproc_per_node 2 -m pipeline.launch_local`), gloo, DeepSpeed ZeRO-2 fp32, "
        "1 torch thread per rank; digits train 1437 / val 360 images at 32 px; model spikformer_v2_tiny, T=1",
        f"- recipe: pretrain `{json.dumps(stages['pretrain'])}`; finetune `{json.dumps(stages['finetune'])}`",
        f"- SSL vs scratch: the same finetune recipe from the chain's encoder or from scratch; few labels: "
        f"{LABEL_FRACTION:.0%} of the train labels (class-balanced subset, 144 images), {FRACTION_STEPS} "
        "optimizer steps for both inits",
        "- launch wall: the whole torchrun launch (process start, imports, all its stages, exports)",
    ]
    if args.note:
        section.append(f"- note: {args.note}")
    section += ["", *table]
    append_section(section)


if __name__ == "__main__":
    sys.exit(main())
