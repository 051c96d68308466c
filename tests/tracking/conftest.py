"""Fixtures for tracking tests: a sqlite store, a tiny classifier export, a real `mlflow server`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from lineage_chain import Chain, free_port, write_chain

from pipeline.config import MlflowSettings
from pipeline.tracking import Tracker, prepare

SERVER_START_TIMEOUT_S = 150


@pytest.fixture(scope="session")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store per session: creating (migrating) a fresh DB costs seconds on 2 cores."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('sqlite_store')}/mlflow.db"
    prepare(MlflowSettings(tracking_uri=uri, experiment="setup"))
    return uri


@pytest.fixture
def sqlite_tracker(sqlite_store: str, request: pytest.FixtureRequest) -> Tracker:
    """A tracker on its own experiment, so searches in one test never see another test's runs."""
    return prepare(MlflowSettings(tracking_uri=sqlite_store, experiment=request.node.nodeid))


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export as pipeline/train/export.py writes it: model.safetensors + config.json (tiny timm net)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path_factory.mktemp("export")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    config = {"format": "spikformer-export/1", "variant": "test_resnet", "kwargs": {"num_classes": 3}}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def chain_writer() -> Callable[[Tracker, Path], Chain]:
    return write_chain


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")  # noqa: SIM115  (closed at teardown)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root}/backend.db",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {server.returncode}: {_tail(root / 'server.log')}"
                )
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server not healthy after {SERVER_START_TIMEOUT_S}s: {_tail(root / 'server.log')}"
                )
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(server)
        log.close()


def _stop_group(process: subprocess.Popen) -> None:
    """The server forks uvicorn workers into its own session: stop that whole group."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
