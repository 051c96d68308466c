"""Runs end in MLflow with the status that happened, and a re-run continues them.

A real driver (`python -m pipeline local`, one process, sqlite store) is killed mid-finetune:
- SIGKILL: nothing can run in the driver; the re-run continues the same job and stage runs (same ids),
  resumes from the stage's checkpoint and logs every step exactly once;
- SIGTERM (as `ray job stop`, a scheduler or torchrun sends it): the runs end KILLED at once, and the
  re-run continues them too;
- an exception in the stage: FAILED, with the one-line error as a tag.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from lifecycle_driver import (
    EVERY,
    STEPS,
    finish,
    loss_steps,
    runs,
    spec,
    sqlite_uri,
    start,
    wait_for_step,
    write_manifests,
)

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, str]:
    dest = tmp_path_factory.mktemp("lifecycle-shards")
    return write_manifests(dest)


def check_continued(tmp: Path, before: dict[str, list], rerun_log: str) -> None:
    after = runs(sqlite_uri(tmp))
    assert [r.info.run_id for r in after["job"]] == [r.info.run_id for r in before["job"]]
    assert [r.info.run_id for r in after["finetune"]] == [r.info.run_id for r in before["finetune"]]
    finetune = after["finetune"][0]
    assert finetune.info.status == "FINISHED" and after["job"][0].info.status == "FINISHED"
    assert finetune.data.tags["pipeline.resumes"] == "1"
    steps = loss_steps(sqlite_uri(tmp), finetune.info.run_id)
    assert steps == list(range(1, STEPS + 1))  # every step once: resumed, not restarted, nothing twice
    assert "resumed from" in rerun_log and "continuing the interrupted MLflow run" in rerun_log
    assert after["evaluate"][0].info.status == "FINISHED"


@pytest.mark.slow
def test_sigkill_of_the_driver_then_rerun_continues_the_same_runs(tmp_path, manifests):
    job = spec(tmp_path, manifests)
    proc = start(job)
    wait_for_step(sqlite_uri(tmp_path), proc, EVERY + 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = runs(sqlite_uri(tmp_path))
    assert before["job"][0].info.status == "RUNNING" and before["finetune"][0].info.status == "RUNNING"
    check_continued(tmp_path, before, finish(job))


@pytest.mark.slow
def test_sigterm_ends_the_runs_killed_and_a_rerun_continues_them(tmp_path, manifests):
    job = spec(tmp_path, manifests)
    proc = start(job)
    wait_for_step(sqlite_uri(tmp_path), proc, EVERY + 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    before = runs(sqlite_uri(tmp_path))
    assert before["job"][0].info.status == "KILLED" and before["finetune"][0].info.status == "KILLED", out[-3000:]
    assert "pipeline.error" not in before["finetune"][0].data.tags
    check_continued(tmp_path, before, finish(job))


def test_an_exception_ends_the_runs_failed_with_the_error(tmp_path, manifests):
    job = spec(tmp_path, manifests, mixup=0.8, batch_size=15)  # odd batch with mixup: the stage raises
    proc = start(job)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    found = runs(sqlite_uri(tmp_path))
    finetune, job_run = found["finetune"][0], found["job"][0]
    assert finetune.info.status == "FAILED" and job_run.info.status == "FAILED"
    for run in (finetune, job_run):
        assert "batch_size must be even with mixup/cutmix" in run.data.tags["pipeline.error"]
