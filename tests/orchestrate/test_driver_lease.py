"""One live driver per job: the lease on the job run (pipeline/runner/lease.py).

The rules, on a real sqlite MLflow store and real processes: a lease held by a running process on this
host is live, one whose pid has ended is stale at once, another host's is live until its heartbeat is
STALE_AFTER_S old, an ended run holds none. Then two real drivers (`python -m pipeline local`) of one
job: the second refuses in one line naming the live run, its host and pid, as does a driver of another
job whose stage would train into the same folder; after a SIGKILL of the first, the re-run continues
its runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from lifecycle_driver import (
    EVERY,
    finish,
    loss_steps,
    runs,
    spec,
    sqlite_uri,
    start,
    wait_for_step,
    write_manifests,
)

from pipeline.errors import PipelineError
from pipeline.runner import lease

pytestmark = pytest.mark.timeout(900)
LONG_STEPS = 300  # ~60 s of training: two more drivers start and are refused inside it


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, str]:
    return write_manifests(tmp_path_factory.mktemp("lease-shards"))


def job_run_with(tracker, host: str, pid: int, age_s: float = 0.0):
    run_id = tracker.start_job_run("leased")
    value = {"host": host, "pid": pid, "heartbeat": time.time() - age_s}
    tracker.set_tags(run_id, {lease.LEASE_TAG: json.dumps(value)})
    return tracker.get_run(run_id)


@pytest.fixture
def sqlite_tracker(tmp_path):
    from pipeline.config import MlflowSettings
    from pipeline.tracking import prepare

    return prepare(MlflowSettings(tracking_uri=sqlite_uri(tmp_path), experiment="lease"))


def test_lease_rules(sqlite_tracker):
    here = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_here = job_run_with(sqlite_tracker, here, sleeper.pid)
        assert lease.held(live_here).live()
        with pytest.raises(PipelineError) as refused:
            lease.refuse_if_live(live_here, "job leased")
        message = str(refused.value)
        assert "\n" not in message and live_here.info.run_id in message
        assert f"pid {sleeper.pid} on {here}" in message
    finally:
        sleeper.kill()
        sleeper.wait()
    dead_here = sqlite_tracker.get_run(live_here.info.run_id)  # the same lease, its process gone
    assert not lease.held(dead_here).live()
    lease.refuse_if_live(dead_here, "job leased")  # stale at once: no error

    other_fresh = job_run_with(sqlite_tracker, "another-host", 1, age_s=5)
    assert lease.held(other_fresh).live()  # a pid on another host cannot be checked: the heartbeat decides
    other_old = job_run_with(sqlite_tracker, "another-host", 1, age_s=lease.STALE_AFTER_S + 1)
    assert not lease.held(other_old).live()

    sqlite_tracker.finish_run(other_fresh.info.run_id, "KILLED")  # an ended run holds no lease
    assert lease.held(sqlite_tracker.get_run(other_fresh.info.run_id)) is None

    own = job_run_with(sqlite_tracker, here, os.getpid())  # an earlier job of this very process
    assert lease.held(own).mine() and not lease.held(own).live()


@pytest.mark.slow
def test_a_second_driver_refuses_while_the_first_runs_and_a_rerun_after_sigkill_continues(tmp_path, manifests):
    uri = sqlite_uri(tmp_path)
    job = spec(tmp_path, manifests, steps=LONG_STEPS)
    # another job (another spec digest) whose finetune has the same fingerprint, so the same output folder
    other = tmp_path / "other.yaml"
    other_spec = json.loads(job.read_text())
    other_spec["stages"]["evaluate"]["batch_size"] = 64
    other.write_text(json.dumps(other_spec))

    first = start(job)
    wait_for_step(uri, first, EVERY + 5)
    job_run = runs(uri)["job"][0].info.run_id
    began = time.monotonic()
    second, third = start(job), start(other)  # both while the first trains
    out, other_out = (proc.communicate(timeout=300)[0] for proc in (second, third))
    refused_in = time.monotonic() - began
    assert first.poll() is None, "the first driver should still be training"  # and trains on
    assert second.returncode == 2 and third.returncode == 2, out[-3000:] + other_out[-3000:]

    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert job_run in errors[0] and f"pid {first.pid} on {socket.gethostname()}" in errors[0]
    assert "Traceback" not in out and "resumed" not in out
    other_errors = [line for line in other_out.splitlines() if line.startswith("error:")]
    assert len(other_errors) == 1 and "stage finetune" in other_errors[0] and job_run in other_errors[0], \
        other_out[-3000:]
    assert "Traceback" not in other_out and "resumed" not in other_out
    found = runs(uri)
    assert len(found["finetune"]) == 1 and found["finetune"][0].info.status == "RUNNING"  # not superseded
    assert [r.info.run_id for r in found["job"] if r.info.status == "RUNNING"] == [job_run]

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    rerun = finish(job)  # same host, dead pid: the lease is stale at once
    assert "continuing the interrupted job run" in rerun and "resumed from" in rerun
    after = runs(uri)
    assert after["job"][0].info.run_id == job_run and after["job"][0].info.status == "FINISHED"
    finetune = after["finetune"][0]
    assert finetune.info.status == "FINISHED" and finetune.data.tags["pipeline.resumes"] == "1"
    assert loss_steps(uri, finetune.info.run_id) == list(range(1, LONG_STEPS + 1))
    print(f"the second and third drivers were refused within {refused_in:.1f} s")
