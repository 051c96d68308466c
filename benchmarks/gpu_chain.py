"""A real short chain through the local launcher: synthetic shards -> pretrain -> finetune -> evaluate.

    python benchmarks/gpu_chain.py --work DIR [--json FILE] [--dry]

1. writes synthetic images (class-coloured JPEGs, 224 px; 32 px with --dry) in ImageFolder layout and
   shards them with the project's writer (`python -m pipeline shards imagefolder ... --no-ray`);
2. writes the job spec DIR/job.yaml (job_spec below: every key in one place, easy to adapt);
3. runs it: `torchrun --standalone --nproc_per_node 1 -m pipeline.launch_local DIR/job.yaml`
   (DeepSpeed ZeRO-2; on a GPU nccl and bf16, with --dry gloo and fp32 on the CPU), MLflow in a sqlite
   store DIR/mlflow.db;
4. checks the store: the job run and the pretrain, finetune and evaluate runs are FINISHED; on a GPU
   also that NCCL set up a communicator (NCCL_DEBUG=VERSION prints its version into the log).

GPU sizes: spikformer_v2_8_512, 384 train / 128 val images of 8 classes, batch 32, 30 optimizer steps
of pretraining (T = 1) and 30 of finetuning (T = 4), evaluation of every val image once.
--dry: spikformer_v2_tiny, 64 / 32 images of 4 classes, batch 8, 4 + 4 steps, no DataLoader workers.
The JSON holds the checks, each run's status, duration and last metrics, and the spec. Exit status 1
when a check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("pretrain", "finetune", "evaluate")
STAGE_TAG = "pipeline.stage"  # pipeline.tracking.STAGE_TAG (not imported: the check reads the store only)
EXPERIMENT = "gpu-check"

SIZES = {
    False: {"variant": "spikformer_v2_8_512", "img": 224, "classes": 8, "train": 384, "val": 128, "batch": 32,
            "steps": 30, "finetune_T": 4, "workers": 4, "shard": 64},
    True: {"variant": "spikformer_v2_tiny", "img": 32, "classes": 4, "train": 64, "val": 32, "batch": 8,
           "steps": 4, "finetune_T": 1, "workers": 0, "shard": 16},
}


def write_images(root: Path, split: str, count: int, classes: int, size: int, seed: int) -> None:
    """ROOT/SPLIT/class_k/*.jpg: a class colour plus smooth noise, so the classes can be told apart."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 216, size=(classes, 3))
    for i in range(count):
        label = i % classes
        folder = root / split / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        noise = rng.normal(0, 40, size=(8, 8, 3))
        small = np.clip(palette[label] + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        (folder / f"{split}_{i:05d}.jpg").write_bytes(buffer.getvalue())


def write_shards(work: Path, split: str, shard_max: int, env: dict[str, str]) -> str:
    """Shard one split with the project's CLI; returns its manifest path."""
    command = [sys.executable, "-m", "pipeline", "shards", "imagefolder", str(work / "shards"),
               "--root", str(work / "images" / split), "--split", split, "--shard-max-count", str(shard_max),
               "--no-ray", "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    print(done.stdout + done.stderr)
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"shards {split}: exit status {done.returncode}: {lines[-1]}")
    manifest = work / "shards" / f"{split}.manifest.json"
    if not manifest.is_file():
        raise RuntimeError(f"shards {split}: the writer left no {manifest}")
    return str(manifest)


def loader_workers_key() -> str:
    """data.loader_workers (data.num_workers before the rename): whichever the job spec knows."""
    from pipeline.config import DataSettings

    return "loader_workers" if "loader_workers" in DataSettings.model_fields else "num_workers"


def job_spec(work: Path, manifests: dict[str, str], size: dict, dry: bool) -> dict:
    steps, batch = size["steps"], size["batch"]
    loop = {"epochs": 100, "max_steps": steps, "batch_size": batch, "log_every_steps": max(steps // 3, 1),
            "firing_rate_every_steps": max(steps // 2, 1), "checkpoint": {"every_steps": max(steps // 2, 1)}}
    return {
        "name": "gpu-check-dry" if dry else "gpu-check",
        "output_root": str(work / "out"),
        "seed": 0,
        "data": {"train": manifests["train"], "val": manifests["val"], loader_workers_key(): size["workers"]},
        "model": {"variant": size["variant"], "img_size": size["img"], "num_classes": size["classes"]},
        "deepspeed": {"zero_stage": 2, "precision": "fp32" if dry else "bf16"},
        "stages": {
            "pretrain": {**loop, "T": 1, "reconstruction_every_steps": steps,
                         "optimizer": {"base_lr": 1.5e-4, "warmup_epochs": 0.5}},
            "finetune": {**loop, "T": size["finetune_T"], "optimizer": {"base_lr": 6e-4, "warmup_epochs": 0.5}},
            "evaluate": {"batch_size": 2 * batch, "energy_batches": 1},
        },
        "scaling": {"num_workers": 1, "use_gpu": not dry},
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": EXPERIMENT,
                   "registered_model": "gpu-check-classifier"},
    }


def run_launcher(command: list[str], env: dict[str, str], log, timeout: float | None) -> int | str:
    """Exit status of torchrun, or "timeout": then SIGTERM, which torchrun passes on to its workers."""
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        return launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
        return "timeout"


def read_runs(tracking_uri: str) -> tuple[dict, list[dict]]:
    """(stage -> run facts, job runs) from the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return {}, []
    stages, jobs = {}, []
    for run in client.search_runs([experiment.experiment_id]):
        facts = {"run_id": run.info.run_id, "status": run.info.status,
                 "duration_s": (run.info.end_time - run.info.start_time) / 1e3 if run.info.end_time else None,
                 "metrics": dict(run.data.metrics)}
        stage = run.data.tags.get(STAGE_TAG)
        if stage is None:
            jobs.append(facts)
        else:
            stages[stage] = facts
    return stages, jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder (images, shards, outputs, store)")
    parser.add_argument("--json", type=Path, default=None, help="write the checks and run facts here")
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (gloo, fp32)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for the launcher (default: GPU_CHECK_STEP_LIMIT - 30, set by gpu_check.sh)")
    args = parser.parse_args(argv)
    if args.timeout is None and os.environ.get("GPU_CHECK_STEP_LIMIT"):
        args.timeout = max(float(os.environ["GPU_CHECK_STEP_LIMIT"]) - 30, 10)  # room to read the store
    size = SIZES[args.dry]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if args.dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a machine with a GPU
    else:
        env["NCCL_DEBUG"] = "VERSION"  # NCCL prints its version once it sets up a communicator

    started = time.perf_counter()
    result: dict = {"dry": args.dry, "sizes": size, "checks": {}, "problems": []}
    try:
        chain(work, size, env, args, result)
    except Exception as exc:  # noqa: BLE001 (recorded: the JSON says what broke)
        result["problems"].append(f"{type(exc).__name__}: {exc}")
    checks = result["checks"]
    result["problems"] += [f"check failed: {name}" for name, ok in checks.items() if not ok]
    result["status"] = "passed" if checks and not result["problems"] else "failed"
    result["wall_s"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    for problem in result["problems"]:
        print(f"PROBLEM: {problem}")
    print(f"chain {result['status']} in {result['wall_s']:.0f} s")
    return 0 if result["status"] == "passed" else 1


def chain(work: Path, size: dict, env: dict[str, str], args: argparse.Namespace, result: dict) -> None:
    """Shards, spec, launch, store checks: fills ``result`` as it goes."""
    started = time.perf_counter()
    for split, seed in (("train", 0), ("val", 1)):
        write_images(work / "images", split, size[split], size["classes"], size["img"], seed)
    manifests = {split: write_shards(work, split, size["shard"], env) for split in ("train", "val")}
    result["shards_s"] = time.perf_counter() - started

    import yaml

    spec = job_spec(work, manifests, size, args.dry)
    result["spec"] = spec
    (work / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "pipeline.launch_local", str(work / "job.yaml")]
    result["command"] = " ".join(command[1:])
    launch_start = time.perf_counter()
    with (work / "launcher.log").open("w") as log:
        result["launcher_rc"] = run_launcher(command, env, log, args.timeout)
    result["launcher_s"] = time.perf_counter() - launch_start
    if result["launcher_rc"] == "timeout":
        result["problems"].append(f"the launcher ran past {args.timeout:.0f} s and was stopped")
    text = (work / "launcher.log").read_text(errors="replace")
    result["launcher_log_tail"] = text[-4000:]
    print(text[-3000:])

    stages, jobs = read_runs(spec["mlflow"]["tracking_uri"])
    result["runs"], result["job_runs"] = stages, jobs
    checks = result["checks"]
    checks["launcher exited 0"] = result["launcher_rc"] == 0
    checks["job run FINISHED"] = len(jobs) == 1 and jobs[0]["status"] == "FINISHED"
    for stage in STAGES:
        checks[f"{stage} run FINISHED"] = stages.get(stage, {}).get("status") == "FINISHED"
    if not args.dry:  # the engine takes nccl when CUDA is there; this says NCCL really ran
        checks["NCCL communicator set up"] = "NCCL version" in text

if __name__ == "__main__":
    sys.exit(main())
