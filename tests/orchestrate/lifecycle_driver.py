"""Real drivers of a tiny finetune job for the lifecycle tests: the spec, starting `python -m pipeline
local` as a subprocess, reading its runs back, and a real `mlflow server` that a test can kill and start
again on the same port and database."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 120, 20
SERVER_START_TIMEOUT_S = 150

def write_manifests(dest: Path) -> dict[str, str]:
    """The digits dataset as train/val shard sets (a few hundred images each)."""
    from pipeline.data.writer import write_shards

    return {split: write_shards("digits", str(dest), split=split, shard_max_count=500, workers=0,
                                progress=False).manifest_url for split in ("train", "val")}


def sqlite_uri(tmp: Path) -> str:
    return f"sqlite:///{tmp}/mlflow.db"


def spec(tmp: Path, manifests: dict[str, str], tracking_uri: str | None = None, steps: int = STEPS,
         **finetune) -> Path:
    job = {
        "name": "lifecycle", "output_root": str(tmp / "out"),
        "data": {"train": manifests["train"], "val": manifests["val"], "loader_workers": 0},
        "model": {"variant": "spikformer_v2_tiny", "img_size": 32, "num_classes": 10},
        "scaling": {"num_workers": 1},
        "mlflow": {"tracking_uri": tracking_uri or sqlite_uri(tmp), "experiment": "lifecycle",
                   "registered_model": "lifecycle"},
        "stages": {
            "pretrain": {"enabled": False},
            "finetune": {"init": "scratch", "max_steps": steps, "batch_size": 16, "mixup": 0.0, "cutmix": 0.0,
                         "log_every_steps": 1, "checkpoint": {"every_steps": EVERY},
                         "augment": {"auto_augment": None, "re_prob": 0.0}, **finetune},
            "evaluate": {"batch_size": 128, "energy_batches": 1},
        },
    }
    path = tmp / "job.yaml"
    path.write_text(json.dumps(job))
    return path


def start(job: Path, **env_overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.update(env_overrides)
    return subprocess.Popen([sys.executable, "-m", "pipeline", "local", str(job)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def runs(uri: str) -> dict[str, list]:
    """The experiment's runs by stage ("job" for job runs), oldest first."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lifecycle")
    found: dict[str, list] = {}
    if experiment is None:
        return found
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        found.setdefault(run.data.tags.get("pipeline.stage", "job"), []).append(run)
    return found


def loss_steps(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss"))


def wait_for_step(uri: str, proc: subprocess.Popen, step: int, timeout_s: float = 300) -> None:
    """Until the finetune run logged `step` (past a checkpoint), while the driver is still running."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        finetune = runs(uri).get("finetune")
        if finetune and any(s >= step for s in loss_steps(uri, finetune[-1].info.run_id)):
            return
        time.sleep(0.3)
    raise AssertionError(f"finetune never reached step {step}")


def finish(job: Path, **env: str) -> str:
    proc = start(job, **env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts) that can be killed and started
    again on the same port and store, as a server restart would."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/backend.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise AssertionError(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S}s")

    def kill(self) -> None:
        """SIGKILL to the server and its workers (its own process group), as a crash would."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None
