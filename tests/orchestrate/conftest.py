"""A real Ray head on 127.0.0.1 (started with `ray start`, stopped at teardown) for job tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head():
    """Yields (gcs_address, dashboard_url); the venv's bin comes first on PATH so jobs use its python."""
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # A loopback-only test cluster: no token auth (Ray turns it on when ~/.ray/auth_token exists).
    env["RAY_AUTH_MODE"] = "disabled"
    command = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    # Free ports for every fixed-port agent: another Ray in this test session (e.g. the shard
    # writer's local Ray) holds the defaults, and a head whose job agent cannot bind never accepts jobs.
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                 "runtime-env-agent-port", "ray-client-server-port"):
        command.append(f"--{flag}={free_port()}")
    # --block keeps every Ray daemon in this process group, so teardown stops this cluster only
    # (`ray stop` would kill every Ray on the machine, including ones other tests started).
    head = subprocess.Popen([*command, "--block"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_jobs_api(dashboard)
        yield f"127.0.0.1:{gcs_port}", dashboard, env
    finally:
        _stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            time.sleep(2)  # let the daemons of the group exit too
        except subprocess.TimeoutExpired:
            continue


def _wait_for_jobs_api(dashboard: str, timeout_s: float = 180) -> None:
    """Ready = a trivial job was accepted and succeeded (the dashboard answers before its job agent)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.time() + timeout_s
    error: Exception | None = None
    while time.time() < deadline:
        try:
            client = JobSubmissionClient(dashboard)
            job_id = client.submit_job(entrypoint="python -c 'print(1)'")
            break
        except Exception as exc:  # noqa: BLE001 - not up yet ("No available agent to submit job")
            error = exc
            time.sleep(2)
    else:
        raise RuntimeError(f"Ray jobs API at {dashboard} not ready in {timeout_s}s: {error}")
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status == JobStatus.SUCCEEDED:
            return
        if status in (JobStatus.FAILED, JobStatus.STOPPED):
            raise RuntimeError(f"trivial Ray job failed: {client.get_job_logs(job_id)[-2000:]}")
        time.sleep(1)
    raise RuntimeError(f"trivial Ray job did not finish in {timeout_s}s")
