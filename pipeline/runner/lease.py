"""One live driver per job: a lease on the job run, kept as a tag the driver refreshes.

The tag `pipeline.driver_lease` on a RUNNING job run holds `{"host", "pid", "heartbeat"}` (JSON); a
thread of the driver rewrites it every HEARTBEAT_S. Another driver of the same job (same resolved
spec), or of another job whose stage would train into the same folder, reads it and refuses in one
line unless the lease is stale:
- on the same host, at once when that pid no longer runs (a SIGKILLed driver: the re-run continues);
- on any host, when the heartbeat is older than STALE_AFTER_S (a lost machine, a hung driver).
A job run that ended (FINISHED, FAILED, KILLED) holds no lease. MLflow has no compare-and-set, so a
driver that takes a lease waits SETTLE_S and reads it back: of two drivers that took it at the same
moment, the one whose write came last keeps it and the other refuses.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.tracking_journal import pid_running

logger = logging.getLogger(__name__)

LEASE_TAG = "pipeline.driver_lease"
HEARTBEAT_S = float(os.environ.get("PIPELINE_LEASE_HEARTBEAT_S", "30"))
STALE_AFTER_S = float(os.environ.get("PIPELINE_LEASE_STALE_S", "300"))  # 10 missed heartbeats
SETTLE_S = 1.0


@dataclass(frozen=True)
class Lease:
    host: str
    pid: int
    heartbeat: float  # epoch seconds of the last refresh

    def tag(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "heartbeat": round(self.heartbeat, 1)})

    def mine(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.heartbeat
        return f"driver pid {self.pid} on {self.host}, heartbeat {age:.0f} s ago"

    def live(self, now: float | None = None) -> bool:
        """Whether the driver that holds it may still be running (see the module doc)."""
        if self.host == socket.gethostname():
            if self.pid == os.getpid():  # an earlier job of this very process, which has ended
                return False
            if not pid_running(self.pid):
                return False
        return (now or time.time()) - self.heartbeat < STALE_AFTER_S


def mine() -> Lease:
    return Lease(socket.gethostname(), os.getpid(), time.time())


def held(run) -> Lease | None:
    """The lease on an MLflow run, if it is RUNNING and has one."""
    if run.info.status != "RUNNING":
        return None
    text = run.data.tags.get(LEASE_TAG)
    if not text:
        return None
    try:
        value = json.loads(text)
        return Lease(str(value["host"]), int(value["pid"]), float(value["heartbeat"]))
    except (ValueError, KeyError, TypeError):
        logger.warning("run %s: unreadable %s tag %r; treated as stale", run.info.run_id, LEASE_TAG, text)
        return None


def refuse_if_live(run, what: str) -> None:
    """One line naming the live run and its driver, when `run` holds a live lease not ours."""
    lease = held(run)
    if lease is not None and not lease.mine() and lease.live():
        raise PipelineError(
            f"{what} is already running: job run {run.info.run_id} ({lease.describe()}); stop that driver "
            f"first (a lease from another host goes stale {STALE_AFTER_S:.0f} s after its last heartbeat)")


def take(tracker, run_id: str, what: str) -> None:
    """Write our lease on the job run, then read it back after SETTLE_S (see the module doc)."""
    tracker.set_tags(run_id, {LEASE_TAG: mine().tag()})
    time.sleep(SETTLE_S)
    run = tracker.get_run(run_id)
    lease = held(run)
    if lease is not None and not lease.mine():
        refuse_if_live(run, what)


class Heartbeat:
    """Refreshes the lease every HEARTBEAT_S from a daemon thread until stopped. A refresh that fails (the
    tracking server away) is tried again at the next beat; for other hosts the lease only goes stale
    STALE_AFTER_S after the last one that worked."""

    def __init__(self, tracker, run_id: str) -> None:
        self.tracker, self.run_id = tracker, run_id
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="driver-lease", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()

    def _beat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.tracker.set_tags(self.run_id, {LEASE_TAG: mine().tag()})
            except Exception as err:  # noqa: BLE001 - the next beat tries again
                logger.debug("lease heartbeat for run %s failed (the next beat tries again): %s", self.run_id, err)
