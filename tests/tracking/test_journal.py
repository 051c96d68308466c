"""The journal of what could not be sent, and the rank-0 sink that writes it (real sqlite store; an
HTTP store on a port nobody listens on as the server that is away)."""

from __future__ import annotations

import json
import os
import time

from lineage_chain import free_port

from pipeline import tracking_journal
from pipeline.tracking import STOPPED_TAG, Tracker
from pipeline.tracking_sink import stage_sink


def loss_steps(tracker: Tracker, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in tracker.client.get_metric_history(run_id, key))


def test_replay_sends_each_step_once_skips_a_torn_line_and_ends_the_run(sqlite_tracker, tmp_path):
    run_id = sqlite_tracker.start_job_run("journaled")
    sqlite_tracker.log_metrics(run_id, {"loss": 0.3}, step=3)  # this step reached the store live
    journal = tracking_journal.Journal(str(tmp_path), run_id)
    for step in range(1, 6):
        journal.metrics(step, {"loss": 1.0 / step, "lr": 0.1}, time_ms=1_000 * step)
    journal.tags({"pipeline.note": "kept"})
    journal.end("KILLED", "MLflow tracking server unreachable")
    with open(journal.path, "a", encoding="utf-8") as handle:
        handle.write('{"kind": "metrics", "step": 6, "val')  # the writer was killed mid-line

    assert tracking_journal.replay(sqlite_tracker, str(tmp_path)) == 7
    assert loss_steps(sqlite_tracker, run_id) == [1, 2, 3, 4, 5]
    assert loss_steps(sqlite_tracker, run_id, "lr") == [1, 2, 3, 4, 5]
    times = {m.step: m.timestamp for m in sqlite_tracker.client.get_metric_history(run_id, "lr")}
    assert times[4] == 4_000  # when the step happened, not when it was sent
    run = sqlite_tracker.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["pipeline.note"] == "kept"
    assert run.data.tags[STOPPED_TAG] == "MLflow tracking server unreachable"
    assert tracking_journal.pending(str(tmp_path)) == []  # sent, so removed

    # the same records again (a replay cut off before it removed the file): nothing twice
    again = tracking_journal.Journal(str(tmp_path), run_id)
    for step in (4, 5, 6):
        again.metrics(step, {"loss": 0.5}, time_ms=0)
    tracking_journal.replay(sqlite_tracker, str(tmp_path))
    assert loss_steps(sqlite_tracker, run_id) == [1, 2, 3, 4, 5, 6]


def test_a_dead_server_never_blocks_the_training_thread_and_the_journal_keeps_every_step(sqlite_tracker, tmp_path):
    run_id = sqlite_tracker.start_job_run("outage")
    dead = Tracker(f"http://127.0.0.1:{free_port()}", sqlite_tracker.experiment_id, journal_dir=str(tmp_path))
    sink = stage_sink(dead, run_id, enabled=True)
    began = time.monotonic()
    for step in range(1, 41):
        sink.log_metrics({"loss": 1.0 / step}, step)
    queued_in = time.monotonic() - began
    assert queued_in < 1.0, f"40 log calls took {queued_in:.1f} s against a dead server"
    sink.close(timeout_s=5)

    [path] = tracking_journal.pending(str(tmp_path), [run_id])
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert [r["step"] for r in records] == list(range(1, 41))
    # the server is "back" (here: the same run in the sqlite store): every step arrives once
    tracking_journal.replay(sqlite_tracker, str(tmp_path), [run_id])
    assert loss_steps(sqlite_tracker, run_id) == list(range(1, 41))


def test_orphan_replay_leaves_a_live_writers_journal_alone(sqlite_tracker, tmp_path):
    import subprocess
    import sys

    run_id = sqlite_tracker.start_job_run("shared-root")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"{run_id}.{live.pid}.jsonl").write_text(
            json.dumps({"kind": "metrics", "step": 1, "time_ms": 0, "values": {"loss": 1.0}}) + "\n")
        assert tracking_journal.replay(sqlite_tracker, str(tmp_path), orphans=True) == 0  # its own to send
    finally:
        live.kill()
        live.wait()
    assert tracking_journal.replay(sqlite_tracker, str(tmp_path), orphans=True) == 1  # now an orphan
    assert loss_steps(sqlite_tracker, run_id) == [1]


def test_a_journal_the_store_cannot_take_is_set_aside_not_retried_for_ever(sqlite_tracker, tmp_path):
    run_id = sqlite_tracker.start_job_run("rejected")
    journal = tracking_journal.Journal(str(tmp_path), run_id)
    journal.tags({"pipeline.long": "x" * 10_000})  # longer than MLflow takes: rejected, skipped
    journal.metrics(1, {"loss": 1.0}, time_ms=0)
    gone = tracking_journal.Journal(str(tmp_path), "0" * 32)  # a run the store does not have
    gone.metrics(1, {"loss": 1.0}, time_ms=0)

    tracking_journal.replay(sqlite_tracker, str(tmp_path))
    assert loss_steps(sqlite_tracker, run_id) == [1]  # the rest of the file still arrived
    assert tracking_journal.pending(str(tmp_path)) == []
    assert (tmp_path / f"{'0' * 32}.{os.getpid()}.jsonl.rejected").is_file()
