"""Runs end in MLflow with the status that happened, and a re-run continues them.

A real driver (`python -m pipeline local`, one process, sqlite store) is killed mid-finetune:
- SIGKILL: nothing can run in the driver; the re-run continues the same job and stage runs (same ids),
  resumes from the stage's checkpoint and logs every step exactly once;
- SIGTERM (as `ray job stop`, a scheduler or torchrun sends it): the runs end KILLED at once, and the
  re-run continues them too;
- an exception in the stage: FAILED, with the one-line error as a tag.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.writer import write_shards

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 120, 20
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, str]:
    dest = tmp_path_factory.mktemp("lifecycle-shards")
    return {split: write_shards("digits", str(dest), split=split, shard_max_count=500, workers=0,
                                progress=False).manifest_url for split in ("train", "val")}


def spec(tmp: Path, manifests: dict[str, str], **finetune) -> Path:
    job = {
        "name": "lifecycle", "output_root": str(tmp / "out"),
        "data": {"train": manifests["train"], "val": manifests["val"], "loader_workers": 0},
        "model": {"variant": "spikformer_v2_tiny", "img_size": 32, "num_classes": 10},
        "scaling": {"num_workers": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "lifecycle",
                   "registered_model": "lifecycle"},
        "stages": {
            "pretrain": {"enabled": False},
            "finetune": {"init": "scratch", "max_steps": STEPS, "batch_size": 16, "mixup": 0.0, "cutmix": 0.0,
                         "log_every_steps": 1, "checkpoint": {"every_steps": EVERY},
                         "augment": {"auto_augment": None, "re_prob": 0.0}, **finetune},
            "evaluate": {"batch_size": 128, "energy_batches": 1},
        },
    }
    path = tmp / "job.yaml"
    path.write_text(json.dumps(job))
    return path


# set in this process by earlier in-process tests' one-process groups (whose store holds MASTER_PORT)
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def start(job: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "pipeline", "local", str(job)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def runs(tmp: Path) -> dict[str, list]:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("lifecycle")
    found: dict[str, list] = {}
    if experiment is None:
        return found
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        found.setdefault(run.data.tags.get("pipeline.stage", "job"), []).append(run)
    return found


def wait_for_step(tmp: Path, proc: subprocess.Popen, step: int, timeout_s: float = 300) -> None:
    """Until the finetune run logged `step` (past a checkpoint), while the driver is still running."""
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        finetune = runs(tmp).get("finetune")
        if finetune and any(m.step >= step for m in client.get_metric_history(finetune[-1].info.run_id, "loss")):
            return
        time.sleep(0.3)
    raise AssertionError(f"finetune never reached step {step}")


def finish(job: Path) -> str:
    proc = start(job)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def check_continued(tmp: Path, before: dict[str, list], rerun_log: str) -> None:
    after = runs(tmp)
    assert [r.info.run_id for r in after["job"]] == [r.info.run_id for r in before["job"]]
    assert [r.info.run_id for r in after["finetune"]] == [r.info.run_id for r in before["finetune"]]
    finetune = after["finetune"][0]
    assert finetune.info.status == "FINISHED" and after["job"][0].info.status == "FINISHED"
    assert finetune.data.tags["pipeline.resumes"] == "1"
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(finetune.info.run_id, "loss")]
    assert steps == list(range(1, STEPS + 1))  # every step once: resumed, not restarted, nothing twice
    assert "resumed from" in rerun_log and "continuing the interrupted MLflow run" in rerun_log
    assert after["evaluate"][0].info.status == "FINISHED"


@pytest.mark.slow
def test_sigkill_of_the_driver_then_rerun_continues_the_same_runs(tmp_path, manifests):
    job = spec(tmp_path, manifests)
    proc = start(job)
    wait_for_step(tmp_path, proc, EVERY + 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = runs(tmp_path)
    assert before["job"][0].info.status == "RUNNING" and before["finetune"][0].info.status == "RUNNING"
    check_continued(tmp_path, before, finish(job))


@pytest.mark.slow
def test_sigterm_ends_the_runs_killed_and_a_rerun_continues_them(tmp_path, manifests):
    job = spec(tmp_path, manifests)
    proc = start(job)
    wait_for_step(tmp_path, proc, EVERY + 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    before = runs(tmp_path)
    assert before["job"][0].info.status == "KILLED" and before["finetune"][0].info.status == "KILLED", out[-3000:]
    assert "pipeline.error" not in before["finetune"][0].data.tags
    check_continued(tmp_path, before, finish(job))


def test_an_exception_ends_the_runs_failed_with_the_error(tmp_path, manifests):
    job = spec(tmp_path, manifests, mixup=0.8, batch_size=15)  # odd batch with mixup: the stage raises
    proc = start(job)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    found = runs(tmp_path)
    finetune, job_run = found["finetune"][0], found["job"][0]
    assert finetune.info.status == "FAILED" and job_run.info.status == "FAILED"
    for run in (finetune, job_run):
        assert "batch_size must be even with mixup/cutmix" in run.data.tags["pipeline.error"]
