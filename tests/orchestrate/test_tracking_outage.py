"""A real `mlflow server` killed (SIGKILL) while a real driver trains, then started again.

- Back while the stage still trains: training never waits on it (the steps' timestamps, taken when
  each step happened, run on through the outage), one console line says it went away and one that
  it is back, and every step's loss reaches the server exactly once.
- Back only after the driver gave up waiting: the driver exits 2 with one `error:` line, the journal
  holds what was not written, and the re-run sends it and continues the same runs to FINISHED, every
  step once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lifecycle_driver import MlflowServer, finish, loss_steps, runs, spec, start, wait_for_step, write_manifests
from mlflow.tracking import MlflowClient

from pipeline.tracking_journal import pending

pytestmark = pytest.mark.timeout(900)
LONG_STEPS = 300  # ~60 s of training on 2 cores: the server is killed and started again inside it
BLOCK_BOUND_S = 10.0  # no gap between two consecutive training steps may be this long


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, str]:
    dest = tmp_path_factory.mktemp("outage-shards")
    return write_manifests(dest)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root)
    server.start()
    yield server
    server.kill()


def journal_dir(tmp: Path) -> str:
    return str(tmp / "out" / "logs" / "mlflow-journal")


def console_lines(out: str, text: str) -> list[str]:
    return [line for line in out.splitlines() if text in line]


@pytest.mark.slow
def test_server_killed_and_restarted_mid_stage_blocks_nothing_and_loses_no_step(tmp_path, manifests, server):
    job = spec(tmp_path, manifests, tracking_uri=server.url, steps=LONG_STEPS)
    proc = start(job)
    wait_for_step(server.url, proc, 25)
    server.kill()
    killed = time.time()
    time.sleep(8)  # the driver trains on meanwhile
    assert proc.poll() is None
    server.start()
    back = time.time()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]

    found = runs(server.url)
    finetune, job_run = found["finetune"][0], found["job"][0]
    assert len(found["finetune"]) == 1 and len(found["job"]) == 1
    assert finetune.info.status == "FINISHED" and job_run.info.status == "FINISHED"
    assert found["evaluate"][0].info.status == "FINISHED"
    assert loss_steps(server.url, finetune.info.run_id) == list(range(1, LONG_STEPS + 1))  # each once

    # training went on through the outage: steps happened while the server was away, none waited long
    history = sorted(MlflowClient(server.url).get_metric_history(finetune.info.run_id, "loss"),
                     key=lambda m: m.step)
    during = [m.step for m in history if killed * 1000 < m.timestamp < back * 1000]
    assert len(during) >= 10, f"only steps {during} happened during the {back - killed:.0f} s outage"
    gaps = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(history, history[1:], strict=False)]
    assert max(gaps) < BLOCK_BOUND_S, f"training waited {max(gaps):.1f} s between two steps"

    # one line when it went away, one when it came back, no retry chatter, no traceback
    assert len(console_lines(out, "stopped answering")) == 1, out[-6000:]
    assert len(console_lines(out, "answers again")) == 1, out[-6000:]
    assert "Retrying" not in out and "Traceback" not in out
    assert pending(journal_dir(tmp_path)) == []  # everything journaled was sent


@pytest.mark.slow
def test_server_away_past_the_wait_exits_2_and_the_rerun_sends_the_journal_and_continues(
        tmp_path, manifests, server):
    job = spec(tmp_path, manifests, tracking_uri=server.url)
    proc = start(job, PIPELINE_MLFLOW_OUTAGE_WAIT_S="5")
    wait_for_step(server.url, proc, 25)
    server.kill()  # down for good while it trains: it trains on, then cannot end its runs
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "mlflow-journal" in errors[0], out[-4000:]
    assert "Traceback" not in out and "Retrying" not in out, out[-6000:]
    assert len(console_lines(out, "stopped answering")) == 1
    assert pending(journal_dir(tmp_path)), "nothing was journaled"

    server.start()
    before = runs(server.url)
    assert before["finetune"][0].info.status == "RUNNING"  # its end could not be written
    rerun = finish(job)
    assert "sent" in rerun and "continuing the interrupted job run" in rerun, rerun[-4000:]
    after = runs(server.url)
    assert [r.info.run_id for r in after["finetune"]] == [r.info.run_id for r in before["finetune"]]
    assert [r.info.run_id for r in after["job"]] == [r.info.run_id for r in before["job"]]
    finetune = after["finetune"][0]
    assert finetune.info.status == "FINISHED" and after["job"][0].info.status == "FINISHED"
    assert "pipeline.stopped_by" in finetune.data.tags  # why the first driver stopped, kept on the run
    assert loss_steps(server.url, finetune.info.run_id) == list(range(1, 121))
    assert pending(journal_dir(tmp_path)) == []
