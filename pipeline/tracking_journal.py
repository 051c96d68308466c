"""What could not be sent to the tracking store, kept on local disk until it can be.

One JSON-lines file per run and process, `{dir}/{run_id}.{pid}.jsonl`, append-only. A line is one
record: metrics at a step (with the time the step happened), tags, an image (its PNG saved beside
the file), an artifact's local path, or the status a run ended with. `replay` sends a file's records
in order and removes the file once all were sent. Metrics are sent only for the (key, step) pairs the
run does not hold yet, so a replay cut off halfway and run again, or a resumed stage that logged the
same steps live, still records every step once. A torn last line (a process killed mid-write) is
skipped.

Why not MLflow's async logging (`log_batch(..., synchronous=False)`): a batch that fails there is
logged and dropped (its RunOperations only re-raise the error), its queue waits at exit for every
pending batch through the full HTTP retries, and nothing survives the process.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.tracking import Tracker

logger = logging.getLogger(__name__)

SUFFIX = ".jsonl"
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit


def default_dir(output_root: str | None) -> str:
    """`{output_root}/logs/mlflow-journal` for a local output root (beside the log files, so a re-run
    finds it); a folder in the temp dir when outputs live in an object store (which cannot append)."""
    if output_root and ("://" not in output_root or output_root.startswith("file://")):
        return os.path.join(os.path.abspath(output_root.removeprefix("file://")), "logs", "mlflow-journal")
    return os.path.join(tempfile.gettempdir(), "pipeline-mlflow-journal")


class Journal:
    """This process's journal of one run."""

    def __init__(self, directory: str, run_id: str) -> None:
        self.directory, self.run_id = directory, run_id
        self.path = os.path.join(directory, f"{run_id}.{os.getpid()}{SUFFIX}")
        self.count = 0  # records written since the last replay

    def _append(self, record: dict[str, Any]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.count += 1

    def metrics(self, step: int, values: dict[str, float], time_ms: int) -> None:
        self._append({"kind": "metrics", "step": int(step), "time_ms": int(time_ms),
                      "values": {str(k): float(v) for k, v in values.items()}})

    def tags(self, values: dict[str, str]) -> None:
        self._append({"kind": "tags", "values": {str(k): str(v) for k, v in values.items()}})

    def end(self, status: str, reason: str | None = None) -> None:
        self._append({"kind": "end", "status": status, "reason": reason})

    def image(self, image: Any, name: str) -> None:
        """A PIL image (or an image file) saved as a PNG beside the journal."""
        folder = os.path.join(self.directory, f"{self.run_id}.images")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.png")
        if isinstance(image, str | os.PathLike):
            from PIL import Image

            with Image.open(image) as opened:
                opened.convert("RGB").save(path)
        else:
            image.save(path)
        self._append({"kind": "image", "path": path})

    def artifact(self, path: str, subdir: str | None) -> None:
        self._append({"kind": "artifact", "path": os.path.abspath(path), "subdir": subdir})


def pending(directory: str, run_ids: Iterable[str] | None = None, pid: int | None = None,
            orphans: bool = False) -> list[str]:
    """Journal files in `directory`, oldest first; only these runs' / this process's when given;
    `orphans`: only those whose writer (another process on this host) no longer runs."""
    files = glob.glob(os.path.join(glob.escape(directory), f"*{SUFFIX}"))
    wanted = set(run_ids) if run_ids is not None else None
    chosen = []
    for path in files:
        run_id, _, owner = os.path.basename(path)[: -len(SUFFIX)].rpartition(".")
        if wanted is not None and run_id not in wanted or pid is not None and owner != str(pid):
            continue
        if orphans and owner.isdigit() and int(owner) != os.getpid() and pid_running(int(owner)):
            continue  # a live process (another job sharing this output root) replays its own journal
        chosen.append(path)
    return sorted(chosen, key=os.path.getmtime)


def pid_running(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie, killed but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def replay(tracker: Tracker, directory: str, run_ids: Iterable[str] | None = None, pid: int | None = None,
           orphans: bool = False) -> int:
    """Send the journaled records (see `pending` for the selection) and remove each file once sent.
    Returns how many records were sent; an error (the store is still away) leaves the file for later."""
    sent = 0
    for path in pending(directory, run_ids, pid, orphans):
        sent += _replay_file(tracker, path)
        if os.path.exists(path):
            os.remove(path)
        images = os.path.join(os.path.dirname(path), os.path.basename(path).split(".")[0] + ".images")
        if not pending(directory, [os.path.basename(path).split(".")[0]]) and os.path.isdir(images):
            for name in os.listdir(images):
                os.remove(os.path.join(images, name))
            os.rmdir(images)
    return sent


def read(path: str) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line: the writer was killed mid-write
                logger.warning("journal %s: skipped an unreadable line", path)
    return records


def _replay_file(tracker: Tracker, path: str) -> int:
    from mlflow.entities import Metric

    from pipeline.tracking import STOPPED_TAG, is_outage

    run_id = os.path.basename(path).split(".")[0]
    records = read(path)
    keys = sorted({key for r in records if r["kind"] == "metrics" for key in r["values"]})
    try:
        have = tracker.metric_history_steps(run_id, keys) if keys else {}
        tracker.get_run(run_id)
    except Exception as err:
        if is_outage(err):
            raise
        os.replace(path, path + ".rejected")  # kept for a person to read, never tried again
        logger.warning("journal %s: run %s cannot be read (%s); kept as %s.rejected", path, run_id, err, path)
        return 0
    batch: list[tuple[int, int, str, float]] = []

    def guarded(what: str, fn, *args) -> None:
        """An outage ends the replay (the file stays); a record the store rejects is skipped, as it would
        have been when sent live, so one bad record cannot hold back the rest for good."""
        try:
            fn(*args)
        except Exception as err:
            if is_outage(err):
                raise
            logger.warning("journal %s: the store rejected a %s record for run %s: %s", path, what, run_id, err)

    def send_metrics() -> None:
        for start in range(0, len(batch), MAX_METRICS_PER_CALL):
            chunk = [Metric(k, v, t, s) for s, t, k, v in batch[start:start + MAX_METRICS_PER_CALL]]
            guarded("metrics", lambda c=chunk: tracker.client.log_batch(run_id, metrics=c))
        batch.clear()

    def end(record: dict[str, Any]) -> None:
        if record.get("reason"):
            tracker.set_tags(run_id, {STOPPED_TAG: record["reason"]})
        if tracker.get_run(run_id).info.status == "RUNNING":  # a later driver may have ended it already
            tracker.finish_run(run_id, record["status"])

    for record in records:
        kind = record["kind"]
        if kind == "metrics":
            for key, value in record["values"].items():
                if record["step"] not in have.setdefault(key, set()):
                    batch.append((record["step"], record["time_ms"], key, value))
                    have[key].add(record["step"])
            continue
        send_metrics()
        if kind == "tags":
            guarded("tags", tracker.set_tags, run_id, record["values"])
        elif kind == "end":
            guarded("end", end, record)
        elif kind == "image" and os.path.isfile(record["path"]):
            name = os.path.splitext(os.path.basename(record["path"]))[0]
            guarded("image", tracker.log_image, run_id, record["path"], name)
        elif kind == "artifact":
            if os.path.exists(record["path"]):
                guarded("artifact", tracker.log_artifacts, run_id, record["path"], record.get("subdir"))
            else:
                logger.warning("journal %s: artifact %s no longer exists; not sent", path, record["path"])
    send_metrics()
    logger.info("journal %s: %d records sent to run %s", path, len(records), run_id)
    return len(records)
