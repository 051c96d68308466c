"""Helpers of the stage tests: a small job spec, and a launcher that runs stages through the real runner
(`python -m pipeline local` under `torch.distributed.run --nproc_per_node 2`, CPU/gloo, a sqlite MLflow
store in the test's folder); results are read back from that store (imported as a top-level module)."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "_dist_stage.py"
VAL_SAMPLES = 360  # the digits source's fixed 80/20 split: 1437 train / 360 val
EXPERIMENT = "stages-test"
# A tiny, fast recipe: 32 px digits, spikformer_v2_tiny, micro-batch 32 per rank.
BASE_JOB: dict[str, Any] = {
    "name": "stages-test",
    "seed": 0,
    "data": {"loader_workers": 0},
    "model": {"variant": "spikformer_v2_tiny", "img_size": 32, "num_classes": 10},
    "deepspeed": {"zero_stage": 2},
    "stages": {
        "pretrain": {
            "max_steps": 12, "batch_size": 32, "mask_ratio": 0.5,
            "decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4,
            "optimizer": {"base_lr": 6e-3, "warmup_epochs": 0.1},
            "augment": {"scale": [0.5, 1.0], "hflip": 0.0},
            "log_every_steps": 4, "firing_rate_every_steps": 8, "reconstruction_every_steps": 8,
            "checkpoint": {"every_steps": 4},
        },
        "finetune": {
            "max_steps": 12, "batch_size": 32, "drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0,
            "label_smoothing": 0.0,
            "optimizer": {"base_lr": 1.6e-2, "warmup_epochs": 0.1, "layer_decay": None},
            # no augmentation: the tiny spiking model learns digits fastest without it
            "augment": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "auto_augment": None,
                        "re_prob": 0.0},
            "log_every_steps": 4, "checkpoint": {"every_steps": 4},
        },
        "evaluate": {"batch_size": 64, "energy_batches": 1},
    },
}


def make_job(shards: dict[str, str], **changes: Any) -> dict[str, Any]:
    """BASE_JOB with the shard manifests and dotted-key changes, e.g. {"stages.finetune.max_steps": 40}."""
    job = copy.deepcopy(BASE_JOB)
    job["data"].update(train=shards["train"], val=shards["val"])
    job["mlflow"] = {"experiment": EXPERIMENT, "registered_model": "stages-test"}
    for dotted, value in changes.items():
        node = job
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, job: dict[str, Any], stages: str, *, expect_rc: int = 0, timeout: int = 600,
           nproc: int = 2, fault: str | None = None) -> subprocess.CompletedProcess:
    """Run `stages` of `job` with `nproc` CPU processes; outputs in out/outputs, MLflow in out/mlflow.db.

    expect_rc 0: the run must succeed; anything else: it must fail (e.g. the fault hook killed it).
    fault: "<stage>:<rank>:<step>" arms the test fault hook (PIPELINE_TEST_FAULT).
    """
    out.mkdir(parents=True, exist_ok=True)
    job = {**job, "output_root": str(out / "outputs"),
           "mlflow": {**job.get("mlflow", {}), "tracking_uri": tracking_uri(out)}}
    job_path = out / "job.yaml"
    job_path.write_text(json.dumps(job))  # JSON is YAML
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "STAGE_TRACE_DIR": str(out),
        "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("PIPELINE_TEST_FAULT", None)
    if fault:
        env["PIPELINE_TEST_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT), str(job_path),
           "--stages", stages]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if (proc.returncode != 0) != (expect_rc != 0):
        pytest.fail(f"torchrun exited {proc.returncode} (expected {'0' if expect_rc == 0 else 'a failure'}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return proc


def tracking_uri(out: Path) -> str:
    return f"sqlite:///{out}/mlflow.db"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trace(out: Path, stage: str, rank: int = 0) -> list[dict[str, Any]]:
    path = out / f"trace-rank{rank}.jsonl"
    return [r for r in read_jsonl(path) if r["stage"] == stage] if path.exists() else []


class Records:
    """What the runner recorded in out/mlflow.db, read the way a user would (MlflowClient)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.client = MlflowClient(tracking_uri(out))
        self.experiment = self.client.get_experiment_by_name(EXPERIMENT).experiment_id

    def runs(self, stage: str, status: str | None = None) -> list:
        query = f"tags.`pipeline.stage` = '{stage}'" + (f" and attributes.status = '{status}'" if status else "")
        return self.client.search_runs([self.experiment], query, order_by=["attributes.start_time DESC"])

    def run(self, stage: str):
        """The newest FINISHED run of `stage`."""
        runs = self.runs(stage, "FINISHED")
        assert runs, f"no FINISHED {stage} run in {self.out}/mlflow.db"
        return runs[0]

    def result(self, stage: str) -> dict[str, Any]:
        run = self.run(stage)
        return {"export_url": run.data.tags.get("pipeline.export_url"),
                "export_digest": run.data.tags.get("pipeline.export_digest"), "metrics": run.data.metrics}

    def folder(self, stage: str) -> Path:
        """The stage's output folder, {output_root}/{stage}-{fingerprint[:12]}."""
        return self.out / "outputs" / f"{stage}-{self.run(stage).data.tags['fingerprint'][:12]}"

    def history(self, stage: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run(stage).info.run_id, key)]

    def artifacts(self, stage: str, path: str | None = None) -> list[str]:
        return sorted(a.path for a in self.client.list_artifacts(self.run(stage).info.run_id, path))


def result(out: Path, stage: str) -> dict[str, Any]:
    return Records(out).result(stage)
