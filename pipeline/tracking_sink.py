"""StageContext logging callbacks backed by the MLflow Tracker, for rank 0 of a stage.

Other ranks get no-op callbacks, so only one process writes to the store. The training thread never
waits on the store: each call is queued and a sender thread sends it. When the store stops answering,
the sender says so in one console line, writes what it cannot send to the run's journal
(pipeline.tracking_journal) and probes the store every few seconds; when it answers again the
journal is sent (each step once) and one line says so. `close_sinks` at the end of the stage waits a
bounded time for the queue; what is left stays in the journal, for the driver or the next run.
A record the store rejects (not an outage) is a warning, as before: tracking never ends a training run.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline import tracking_journal
from pipeline.tracking import PROBE_EVERY_S, Tracker, answers, is_outage, outage_reason

logger = logging.getLogger(__name__)

DRAIN_S = 30.0  # at the end of a stage, how long the sender may go on sending what is queued
# + one request still in flight: 3 attempts of MLFLOW_HTTP_REQUEST_TIMEOUT (tracking.HTTP_SETTINGS) and backoff
IN_FLIGHT_S = 3 * 20 + 5
_STOP = object()
_OPEN: list[_Sender] = []


class _Sender(threading.Thread):
    """Sends one run's records in order; on an outage, journals them until the store answers again."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        super().__init__(name=f"mlflow-sink-{run_id[:8]}", daemon=True)
        self.tracker, self.run_id = tracker, run_id
        directory = tracker.journal_dir or tracking_journal.default_dir(None)
        self.journal = tracking_journal.Journal(directory, run_id)
        self.items: queue.Queue = queue.Queue()  # unbounded: a put never blocks the training thread
        self.logged: dict[str, int] | None = None  # highest step the run already has, per key
        self.down_since: float | None = None
        self.deadline: float | None = None  # set by close(): after it, journal instead of sending
        self.replay_failed = False

    # ------------------------------------------------------------------ the thread

    def run(self) -> None:
        next_probe = 0.0
        while True:
            timeout = max(0.05, next_probe - time.monotonic()) if self.down_since is not None else None
            try:
                item = self.items.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if self.down_since is not None and time.monotonic() >= next_probe and not self._closing():
                self._try_recover()
                next_probe = time.monotonic() + PROBE_EVERY_S
            if item is None:
                continue
            if self.down_since is not None or self._closing():
                self._journal(item)
                continue
            try:
                self._send(item)
            except Exception as err:  # noqa: BLE001 - tracking must not end a training run
                if not is_outage(err):
                    logger.warning("MLflow %s logging failed for run %s: %s", item[0], self.run_id, err)
                    continue
                self._journal(item)
                self.down_since = time.monotonic()
                next_probe = self.down_since + PROBE_EVERY_S
                logger.warning("MLflow tracking server %s stopped answering (%s); training goes on, what "
                               "it cannot take is kept in %s", self.tracker.tracking_uri,
                               outage_reason(err), self.journal.path)

    def _closing(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _send(self, item: tuple) -> None:
        kind = item[0]
        if kind == "metrics":
            _, step, values, time_ms = item
            if self.logged is None:
                self.logged = self.tracker.metric_steps(self.run_id)
            fresh = {k: v for k, v in values.items() if step > self.logged.get(k, -1)}
            if fresh:
                self.tracker.log_metrics(self.run_id, fresh, step, timestamp_ms=time_ms)
                self.logged.update(dict.fromkeys(fresh, step))
        elif kind == "image":
            self.tracker.log_image(self.run_id, item[1], item[2])
        elif kind == "artifact":
            self.tracker.log_artifacts(self.run_id, item[1], item[2])
        elif kind == "tags":
            self.tracker.set_tags(self.run_id, item[1])

    def _journal(self, item: tuple) -> None:
        kind = item[0]
        try:
            if kind == "metrics":
                self.journal.metrics(item[1], item[2], item[3])
            elif kind == "image":
                self.journal.image(item[1], item[2])
            elif kind == "artifact":
                self.journal.artifact(item[1], item[2])
            elif kind == "tags":
                self.journal.tags(item[1])
        except Exception as err:  # noqa: BLE001 - a full disk: the record is lost, training goes on
            logger.warning("MLflow journal %s: could not keep a %s record: %s", self.journal.path, kind, err)

    def _try_recover(self) -> None:
        if not answers(self.tracker.tracking_uri):
            return
        try:
            sent = tracking_journal.replay(self.tracker, self.journal.directory, [self.run_id], os.getpid())
        except Exception as err:  # noqa: BLE001 - still away (or away again): keep journaling
            if not self.replay_failed:  # once per outage: the next probe tries again
                logger.warning("MLflow tracking server %s answers its health check but not yet the journal "
                               "(%s); trying again", self.tracker.tracking_uri, outage_reason(err))
            self.replay_failed = True
            return
        away = time.monotonic() - (self.down_since or time.monotonic())
        self.down_since, self.logged, self.replay_failed = None, None, False  # re-read the history
        self.journal.count = 0
        logger.info("MLflow tracking server %s answers again after %.0f s: %d journaled records sent",
                    self.tracker.tracking_uri, away, sent)

    # ------------------------------------------------------------------ the training thread's side

    def put(self, item: tuple) -> None:
        self.items.put(item)

    def close(self, timeout_s: float) -> None:
        """Send what is queued for up to `timeout_s`, journal the rest, stop the thread."""
        self.deadline = time.monotonic() + timeout_s
        self.items.put(_STOP)
        self.join(timeout_s + IN_FLIGHT_S)
        if self.is_alive():
            logger.warning("MLflow sink for run %s still busy after %.0f s; its last records may be lost",
                           self.run_id, timeout_s)
        if self.journal.count:
            logger.warning("MLflow: %d records of run %s could not be sent; kept in %s, sent when the server "
                           "answers (by this job's driver or its next run)", self.journal.count, self.run_id,
                           self.journal.path)


@dataclass
class StageSink:
    tracker: Tracker | None
    run_id: str | None
    sender: _Sender | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.tracker is not None and self.run_id is not None

    def _put(self, item: tuple) -> None:
        if self.sender is None or self.sender.deadline is not None:  # none yet, or closed by close_sinks
            self.sender = _Sender(self.tracker, self.run_id)
            self.sender.start()
            _OPEN.append(self.sender)
        self.sender.put(item)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and metrics:
            values = {k: _number(v) for k, v in metrics.items()}
            self._put(("metrics", int(step), values, int(time.time() * 1000)))

    def log_image(self, image: Any, name: str) -> None:
        if self.active:
            self._put(("image", image, os.path.splitext(name)[0]))

    def log_artifact(self, path: str, subdir: str | None = None) -> None:
        if self.active:
            self._put(("artifact", path, subdir))

    def set_tag(self, key: str, value: str) -> None:
        if self.active:
            self._put(("tags", {key: str(value)}))

    def close(self, timeout_s: float = DRAIN_S) -> None:
        if self.sender is not None:
            self.sender.close(timeout_s)
            if self.sender in _OPEN:
                _OPEN.remove(self.sender)
            self.sender = None


def close_sinks(timeout_s: float = DRAIN_S) -> None:
    """End of a stage in this process: drain every open sink (bounded), journal what is left."""
    for sender in list(_OPEN):
        sender.close(timeout_s)
        _OPEN.remove(sender)


def stage_sink(tracker: Tracker | None, run_id: str | None, enabled: bool) -> StageSink:
    return StageSink(tracker if enabled else None, run_id if enabled else None)


def _number(value: Any) -> Any:
    """A 0-d tensor becomes a float here, on the training thread (the tensor may change after)."""
    return value.item() if hasattr(value, "item") else value


