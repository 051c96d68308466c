"""The job loop: per stage, resolve -> open its MLflow run -> launch on a backend -> finish.

A backend launches one stage on every rank and returns rank 0's StageResult:
- `RayBackend` (ray_backend.py): a Ray Train TorchTrainer per stage, from a driver process;
- `LocalBackend` (local_backend.py): the processes torchrun / accelerate launch started; rank 0 runs
  this loop and the other ranks follow it.

One live driver per job: the job run carries a lease (lease.py) its driver refreshes; another driver
of the same job refuses unless that lease is stale. The driver's MLflow calls ride out a tracking
server outage for up to OUTAGE_WAIT_S; if the server stays away, what could not be written (unsent
metrics, the runs' ends) is in the journal (pipeline.tracking_journal), which the next run of the job
sends before it continues the runs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline import lineage, tracking, tracking_journal
from pipeline.config import JobConfig, flatten_params, resolved_dict
from pipeline.errors import PipelineError
from pipeline.fingerprint import stage_fingerprint
from pipeline.redact import redact_url
from pipeline.runner import lease
from pipeline.runner.context import StageLaunch
from pipeline.runner.datasets import Datasets, resolve_datasets
from pipeline.runner.preflight import check_job
from pipeline.runner.resolve import StageOutcome, StagePlan, resolve_stage, selected_stages
from pipeline.stages.context import StageResult
from pipeline.stages.table import STAGES

logger = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    shard_workers: int | None  # how shards are written: None = Ray tasks, 0 = in this process

    def start(self, job: JobConfig) -> None: ...

    def launch(self, job: JobConfig, plan: StagePlan, launch: StageLaunch) -> StageResult: ...


@dataclass
class JobOutcome:
    job_run_id: str
    tracking_uri: str
    stages: dict[str, StageOutcome] = field(default_factory=dict)


class StopRequested(BaseException):
    """SIGTERM (`ray job stop`, a scheduler, torchrun tearing down): the job ends KILLED, like Ctrl-C."""


_OPEN_RUNS: list[tuple[object, str]] = []  # (tracker, run id) of this driver's job and stage runs


_WATCHING = False
_WAKEUP: list[socket.socket] = []
STOP_GRACE_S = 10.0  # after SIGTERM, how long the main thread may take to unwind before the process exits
# how long the driver waits for a tracking server that stopped answering before the job gives up
OUTAGE_WAIT_S = float(os.environ.get("PIPELINE_MLFLOW_OUTAGE_WAIT_S", "180"))


def _end_open_runs() -> None:
    for tracker, run_id in list(_OPEN_RUNS):
        try:
            tracker.finish_run(run_id, "KILLED")
        except Exception:  # noqa: BLE001 - best effort: the process is being stopped
            pass


def _stop_on_sigterm() -> None:
    """SIGTERM ends this driver's open runs KILLED, then unwinds the main thread (StopRequested). A main
    thread blocked inside a native call (Ray's `ray.get` in TorchTrainer.fit) never runs a Python signal
    handler, so a watcher thread woken through the signal wakeup fd ends the runs and exits the process
    if the main thread has not finished unwinding after STOP_GRACE_S."""
    global _WATCHING
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, _frame):
        # end the records first: `ray job stop` follows SIGTERM with SIGKILL after a few seconds
        _end_open_runs()
        raise StopRequested(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
    if _WATCHING:
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    _WAKEUP.extend((reader, writer))  # kept open for the life of the process (a closed pair reads EOF)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            data = reader.recv(64)  # blocks until a signal with a Python handler arrives
            if not data:
                return
            if signal.SIGTERM in data:
                time.sleep(STOP_GRACE_S)
                _end_open_runs()
                logger.warning("stopped by SIGTERM")
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()
    _WATCHING = True


@contextmanager
def _open(tracker, run_id: str):
    entry = (fast(tracker), run_id)  # a signal handler must not wait out an outage
    _OPEN_RUNS.append(entry)
    try:
        yield
    finally:
        _OPEN_RUNS.remove(entry)


def ending(err: BaseException) -> tuple[str, str | None]:
    """The MLflow status an exception means, and the one-line error a FAILED run keeps."""
    if isinstance(err, (KeyboardInterrupt, StopRequested, SystemExit)):  # stopped from outside, not an error
        return "KILLED", None
    if isinstance(err, tracking.TrackingUnavailable):  # interrupted, not failed: the next run continues it
        return "KILLED", None
    text = redact_url(str(err).strip())  # an error may quote the tracking URI: its password stays out of MLflow
    return "FAILED", f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"


def run_job(job: JobConfig, backend: Backend, only: list[str] | None = None, job_file: str | None = None,
            parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> JobOutcome:
    """parent_run_id/tags: a sweep's cell job run is a child of the sweep's run."""
    stages = selected_stages(job, only)
    tracker = tracking.prepare(job.mlflow)  # fails fast on an unreachable server, creates the DB once
    tracker = tracker.with_settings(outage_wait_s=OUTAGE_WAIT_S,
                                    journal_dir=tracking_journal.default_dir(job.output_root))
    check_job(job, stages, tracker)  # what the spec names exists, before shards, Ray or trainers
    refuse_second_driver(tracker, job, stages)  # before Ray, shards or trainers too
    sent = tracking_journal.replay(tracker, tracker.journal_dir, orphans=True)  # what an earlier run could not send
    if sent:
        logger.info("sent %d MLflow records an earlier run of the job had kept in %s", sent, tracker.journal_dir)
    backend.start(job)
    _stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler (sys.exit)
    datasets = resolve_datasets(job, build=True, shard_workers=backend.shard_workers)
    tags = {"pipeline.job_file": job_file or "", "pipeline.launcher": backend.name, **(tags or {})}
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    job_run_id = open_job_run(tracker, job, stages, tags)
    outcome = JobOutcome(job_run_id, tracker.tracking_uri)
    try:
        with _open(tracker, job_run_id), lease.Heartbeat(fast(tracker), job_run_id):
            for name in stages:
                outcome.stages[name] = run_stage(job, name, tracker, job_run_id, datasets, outcome.stages, backend)
    except BaseException as err:
        end_run(tracker, job_run_id, err)
        if isinstance(err, tracking.TrackingUnavailable):
            raise PipelineError(f"{err}: job {job.name} could not complete; its runs are left to be continued, "
                                f"and what was not written is kept in {tracker.journal_dir} for the next run of "
                                "the job to send") from None
        raise
    try:
        tracker.finish_run(job_run_id, "FINISHED")
    except tracking.TrackingUnavailable as err:
        tracking_journal.Journal(tracker.journal_dir, job_run_id).end("FINISHED")
        raise PipelineError(f"job {job.name}: every stage finished, but the job run {job_run_id} could not be "
                            f"ended ({err}); its end is kept in {tracker.journal_dir} for the next run of the job "
                            "to write") from None
    return outcome


def fast(tracker):
    """The same store without the outage wait: for signal handlers, the heartbeat and the stage's ranks."""
    return tracker.with_settings(outage_wait_s=0.0)


def end_run(tracker, run_id: str, err: BaseException) -> None:
    """End a run with the status `err` means; with the server away, journal the end instead."""
    status, error = ending(err)
    try:
        tracker.finish_run(run_id, status, error)
    except Exception as finish_err:  # noqa: BLE001 - the original error is what the user must see
        if not tracking.is_outage(finish_err):
            logger.warning("run %s could not be ended %s: %s", run_id, status, finish_err)
            return
        journal = tracking_journal.Journal(tracker.journal_dir, run_id)
        if error:
            journal.tags({tracking.ERROR_TAG: error})
        reason = str(err).splitlines()[0] if isinstance(err, tracking.TrackingUnavailable) else None
        journal.end(status, reason)
        logger.info("run %s: its end (%s) is kept in %s", run_id, status, journal.path)


def refuse_second_driver(tracker, job: JobConfig, stages: list[str]) -> None:
    """One line naming the live job run and its driver when another driver runs this job now."""
    for run in _job_runs(tracker, job, spec_digest(job, stages)):
        lease.refuse_if_live(run, f"job {job.name}")


def _job_runs(tracker, job: JobConfig, digest: str) -> list:
    found = tracker.interrupted_runs(f"tags.`{tracking.JOB_TAG}` = '{_quoted(job.name)}' "
                                     f"and tags.`{tracking.SPEC_TAG}` = '{digest}'")
    return [r for r in found if tracking.STAGE_TAG not in r.data.tags]


def run_stage(job: JobConfig, name: str, tracker, job_run_id: str, datasets: Datasets,
              done: dict[str, StageOutcome], backend: Backend) -> StageOutcome:
    plan = resolve_stage(job, name, datasets, done, tracker, strict=True)
    if plan.cached is not None:
        logger.info("stage %s: skipped, fingerprint %s already finished in MLflow run %s",
                    name, plan.fingerprint[:12], plan.cached.run_id)
        tracker.set_tags(job_run_id, {f"pipeline.{name}.reused_run_id": plan.cached.run_id})
        return plan.cached
    run_id = open_stage_run(tracker, job_run_id, job, plan, datasets)
    try:
        with _open(tracker, run_id):
            launch = StageLaunch(name, run_id, plan.inputs, plan.output_url, fast(tracker))
            result = backend.launch(job, plan, launch)
            try:
                # what rank 0 could not send (a server outage during the stage), before the run is ended
                tracking_journal.replay(tracker, tracker.journal_dir, [run_id])
                record_result(tracker, run_id, name, result, job)
                tracker.finish_run(run_id, "FINISHED")
            except tracking.TrackingUnavailable as err:
                raise tracking.TrackingUnavailable(
                    f"{err}; stage {name} finished (outputs in {plan.output_url}) but its MLflow run could not "
                    "be completed") from None
    except BaseException as err:
        end_run(tracker, run_id, err)
        raise
    return StageOutcome(name, plan.fingerprint, run_id, result, skipped=False)


def spec_digest(job: JobConfig, stages: list[str]) -> str:
    """Identifies "the same job again": the resolved spec and the stage selection."""
    return stage_fingerprint("job", {"spec": resolved_dict(job), "stages": stages}, {})


def open_job_run(tracker, job: JobConfig, stages: list[str], tags: dict[str, str]) -> str:
    """The job's parent run: an interrupted run of the same spec is continued (same id), else a new one."""
    digest = spec_digest(job, stages)
    what = f"job {job.name}"
    interrupted = _job_runs(tracker, job, digest)
    for run in interrupted:  # a driver that started since refuse_second_driver looked
        lease.refuse_if_live(run, what)
    if interrupted:
        run_id = _continue(tracker, interrupted)
        lease.take(tracker, run_id, what)
        logger.info("continuing the interrupted job run %s", run_id)
        return run_id
    run_id = tracker.start_job_run(job.name, flatten_params(job), tags={**tags, tracking.SPEC_TAG: digest})
    lease.take(tracker, run_id, what)
    # two drivers that both found nothing opened a run each: the older run keeps the job
    ours = tracker.get_run(run_id).info
    for run in _job_runs(tracker, job, digest):
        other = lease.held(run)
        if (run.info.run_id != run_id and other is not None and not other.mine() and other.live()
                and (run.info.start_time, run.info.run_id) < (ours.start_time, run_id)):
            _supersede(tracker, [tracker.get_run(run_id)], run.info.run_id)
            lease.refuse_if_live(run, what)
    return run_id


def open_stage_run(tracker, job_run_id: str, job: JobConfig, plan: StagePlan, datasets: Datasets) -> str:
    """The stage's child run, with its params, dataset inputs and lineage tags. An interrupted run of the
    same stage and fingerprint under this job run is continued (same id: the stage resumes from its
    checkpoint and its metrics go on from there); one under another job run is ended KILLED and names
    the run that took over."""
    name = plan.stage
    interrupted = tracker.interrupted_runs(f"tags.`{tracking.STAGE_TAG}` = '{name}' "
                                           f"and tags.{lineage.FINGERPRINT} = '{plan.fingerprint}'")
    ours = [r for r in interrupted if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == job_run_id]
    for run in interrupted:  # another job's driver training this stage into the same folder right now
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if run.info.status == "RUNNING" and parent and parent != job_run_id:
            lease.refuse_if_live(tracker.get_run(parent), f"stage {name} (fingerprint {plan.fingerprint[:12]}, "
                                 f"output {plan.output_url})")
    if ours:
        run_id = _continue(tracker, ours)
        logger.info("stage %s: continuing the interrupted MLflow run %s", name, run_id)
    else:
        params = flatten_params(STAGES[name].settings(job), prefix=f"stages.{name}")
        run_id = tracker.start_stage_run(job_run_id, name, plan.fingerprint, params=params)
        for i, (role, url) in enumerate(plan.inputs.manifests.items()):  # the first role is what it learned from
            tracker.log_dataset(run_id, url, datasets.digests[role], context=role, primary=i == 0)
        _lineage(tracker, run_id, plan)
    _supersede(tracker, [r for r in interrupted if r.info.run_id != run_id], run_id)
    return run_id


def _continue(tracker, interrupted: list) -> str:
    """Reopen the newest interrupted run; older ones are ended KILLED, naming it."""
    newest, older = interrupted[0], interrupted[1:]
    tracker.reopen_run(newest.info.run_id, int(newest.data.tags.get(tracking.RESUMES_TAG, "0")) + 1)
    _supersede(tracker, older, newest.info.run_id)
    return newest.info.run_id


def _supersede(tracker, stale: list, by: str) -> None:
    for run in stale:
        tracker.set_tags(run.info.run_id, {tracking.SUPERSEDED_TAG: by})
        if run.info.status != "KILLED":
            tracker.finish_run(run.info.run_id, "KILLED")


def _lineage(tracker, run_id: str, plan: StagePlan) -> None:
    upstream = plan.upstream
    if upstream is None:
        return
    tags = {lineage.UPSTREAM_ARTIFACT_URI: upstream.url}
    if upstream.run_id:
        tags[lineage.UPSTREAM_RUN_ID] = upstream.run_id
    if upstream.reference:
        tags[lineage.UPSTREAM_REFERENCE] = upstream.reference
    tracker.set_tags(run_id, tags)


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def record_result(tracker, run_id: str, name: str, result: StageResult, job: JobConfig) -> None:
    """The export as an artifact and the tags that make it cacheable; register a classifier.

    The stage itself logged its metrics, images and reports (rank 0), so nothing is logged twice."""
    tags = {}
    if result.export_url:
        tags[lineage.EXPORT_URL] = result.export_url
        tracker.log_artifacts(run_id, result.export_url, "export")
    if result.export_digest:
        tags[lineage.EXPORT_DIGEST] = result.export_digest
    if tags:
        tracker.set_tags(run_id, tags)
    if STAGES[name].registers_model and result.export_url:
        version = tracker.register_classifier(
            run_id, result.export_url, job.mlflow.registered_model,
            description=f"Spikformer classifier finetuned by job {job.name}, MLflow run {run_id}",
        )
        tracker.set_tags(run_id, {"pipeline.registered_model": f"{version.name}/{version.version}"})
