"""Credentials stay out of what the pipeline prints, logs and stores (pipeline/redact.py).

The end-to-end case runs `python -m pipeline local` (finetune, 2 steps, a checkpoint at each) against
a real `mlflow server` reached through `http://alice:<password>@127.0.0.1:<port>` (the server has no
auth and ignores the basic-auth header, so the URI works) with a secret-like key in
`deepspeed.config_overrides` (DeepSpeed's comet monitor takes an `api_key`). Neither secret may appear
on the console, in the log file, in the job run's MLflow params, in the `browse the runs:` line or
in any byte of the output folder (checkpoints included). A second run against a sqlite store in a
folder with a space checks that the printed `mlflow ui` command pastes as one argument.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from pipeline.config import flatten_params, load_job
from pipeline.console import configure_logging
from pipeline.data.writer import write_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
import stage_helpers  # noqa: E402  (tests/stages helpers: the small job spec)

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "pw-Zq81-secret"
API_KEY = "key-Hx42-secret"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    dest = tmp_path_factory.mktemp("secret-shards")
    return {split: write_shards("digits", str(dest), split=split, shard_max_count=500, workers=0,
                                progress=False).manifest_url for split in ("train", "val")}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend); yields its URL (no credentials in it)."""
    root = tmp_path_factory.mktemp("secret-mlflow")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/backend.db", "--artifacts-destination", str(root / "art")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, (root / "server.log").read_text()[-3000:]
                try:
                    if requests.get(f"{url}/health", timeout=1).ok:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def local_finetune(tmp_path: Path, shards: dict[str, str], tracking_uri: str, **changes) -> subprocess.CompletedProcess:
    job = stage_helpers.make_job(shards, **{
        "stages.finetune.init": "scratch", "stages.finetune.max_steps": 2, "stages.finetune.log_every_steps": 1,
        "stages.finetune.checkpoint": {"every_steps": 1}, "stages.evaluate.enabled": False,
        "output_root": str(tmp_path / "outputs"), "mlflow.tracking_uri": tracking_uri, **changes})
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "local", str(spec), "--stages", "finetune"], cwd=REPO,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.mark.slow
def test_no_secret_on_the_console_in_logs_params_or_checkpoints(tmp_path, shards, mlflow_server):
    host = mlflow_server.removeprefix("http://")
    done = local_finetune(tmp_path, shards, f"http://alice:{PASSWORD}@{host}",
                          **{"deepspeed.config_overrides": {"comet": {"enabled": False, "api_key": API_KEY}}})
    console = done.stdout + done.stderr
    shown = f"http://alice:***@{host}"
    assert PASSWORD not in console and API_KEY not in console
    assert f"MLflow store {shown}" in console, console[-3000:]  # the line is there, redacted
    browse = next(line for line in done.stdout.splitlines() if line.startswith("browse the runs: "))
    assert browse.startswith(f"browse the runs: {shown}/#/experiments/"), browse

    log = (tmp_path / "outputs" / "logs" / "stages-test-rank0.log").read_text()
    assert PASSWORD not in log and f"MLflow store {shown}" in log

    client = MlflowClient(mlflow_server)
    job_run = client.get_run(done.stdout.split("job run ", 1)[1].split()[0])
    assert job_run.data.params["mlflow.tracking_uri"] == shown
    assert API_KEY not in json.dumps(job_run.data.params) and PASSWORD not in json.dumps(job_run.data.params)

    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    checkpoints = [p for p in files if "checkpoints" in p.parts and p.suffix == ".pt"]
    assert checkpoints, sorted(str(p) for p in files)
    for path in files:
        data = path.read_bytes()
        assert PASSWORD.encode() not in data and API_KEY.encode() not in data, path
    # control: DeepSpeed did store its config, the comet block with it, in the checkpoints
    assert any(b"comet" in p.read_bytes() and b"api_key" in p.read_bytes() for p in checkpoints)


@pytest.mark.slow
def test_the_mlflow_ui_hint_pastes_as_one_argument(tmp_path, shards):
    store = tmp_path / "my runs"
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    done = local_finetune(tmp_path, shards, uri)
    browse = next(line for line in done.stdout.splitlines() if line.startswith("browse the runs: "))
    command = browse.removeprefix("browse the runs: ").split(", then ")[0]
    words = shlex.split(command)  # what a shell makes of the pasted command
    assert words == ["mlflow", "ui", "--backend-store-uri", uri], browse
    job_run_id = done.stdout.split("job run ", 1)[1].split()[0]
    assert MlflowClient(words[-1]).get_run(job_run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------- in one process (fast)


def test_log_lines_and_params_carry_no_url_password(tmp_path, capsys):
    root = logging.getLogger()
    saved = list(root.handlers)
    log_file = tmp_path / "logs" / "job-rank0.log"
    try:
        configure_logging(0, str(log_file))
        logging.getLogger("pipeline.tracking").info("MLflow store %s, experiment %r", f"http://bob:{PASSWORD}@h:5000",
                                                    "e")
        try:
            raise RuntimeError(f"API request to http://bob:{PASSWORD}@h:5000/api failed")
        except RuntimeError:
            logging.getLogger("mlflow.utils").exception("while logging")  # a library's traceback, file only
    finally:
        for handler in list(root.handlers):
            if handler not in saved:
                root.removeHandler(handler)
                handler.close()
    console, text = capsys.readouterr().err, log_file.read_text()
    assert "MLflow store http://bob:***@h:5000" in console and "MLflow store http://bob:***@h:5000" in text
    assert "Traceback" in text and "http://bob:***@h:5000/api" in text  # the traceback is in the file, redacted
    assert PASSWORD not in console and PASSWORD not in text

    job = load_job(REPO / "jobs" / "quickstart.yaml", [f"mlflow.tracking_uri=postgresql://bob:{PASSWORD}@db/mlflow",
                                                       f"deepspeed.config_overrides={{comet: {{api_key: {API_KEY}}}}}"])
    params = flatten_params(job)
    assert params["mlflow.tracking_uri"] == "postgresql://bob:***@db/mlflow"
    assert params["deepspeed.config_overrides.comet.api_key"] == "***"
    assert job.mlflow.tracking_uri.endswith(f"{PASSWORD}@db/mlflow")  # the job itself keeps what it needs


def test_a_failed_runs_error_tag_carries_no_url_password():
    from pipeline.errors import PipelineError
    from pipeline.runner.job import ending

    status, error = ending(PipelineError(f"http://bob:{PASSWORD}@h:5000: tracking server refused the run"))
    assert status == "FAILED" and PASSWORD not in error and "http://bob:***@h:5000" in error, error
