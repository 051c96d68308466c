"""StageContext logging callbacks backed by the MLflow Tracker, for rank 0 of a stage.

Other ranks get no-op callbacks, so only one process writes to the store. A logging failure is
reported as a warning instead of killing hours of training: metrics are also visible in the logs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from pipeline.tracking import Tracker

logger = logging.getLogger(__name__)


@dataclass
class StageSink:
    tracker: Tracker | None
    run_id: str | None
    # highest step already in the run per key: a resumed stage recomputes the steps after its checkpoint
    # (bit for bit), and logging them again would record those steps twice
    logged: dict[str, int] | None = None

    @property
    def active(self) -> bool:
        return self.tracker is not None and self.run_id is not None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        if self.logged is None:
            self.logged = {}
            self._guard("history", lambda: self.logged.update(self.tracker.metric_steps(self.run_id)))
        fresh = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        if fresh:
            self._guard("metrics", self.tracker.log_metrics, self.run_id, fresh, step)

    def log_image(self, image: Any, name: str) -> None:
        if self.active:
            self._guard("image", self.tracker.log_image, self.run_id, image, os.path.splitext(name)[0])

    def log_artifact(self, path: str, subdir: str | None = None) -> None:
        if self.active:
            self._guard("artifact", self.tracker.log_artifacts, self.run_id, path, subdir)

    def set_tag(self, key: str, value: str) -> None:
        if self.active:
            self._guard("tags", self.tracker.set_tags, self.run_id, {key: str(value)})

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - tracking must not end a training run
            logger.warning("MLflow %s logging failed for run %s: %s", what, self.run_id, err)


def stage_sink(tracker: Tracker | None, run_id: str | None, enabled: bool) -> StageSink:
    return StageSink(tracker if enabled else None, run_id if enabled else None)
