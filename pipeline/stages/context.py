"""What a stage function receives from whoever launched it, and what it hands back.

The runner's backends (Ray Train workers, torchrun/accelerate processes) fill a StageContext with
pipeline.runner.context.build_context; the stage never imports Ray or MLflow itself, so the same
code runs everywhere. Rank 0 is the only rank whose
`log_*` callbacks write anything.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


def _ignore(*_args: Any, **_kwargs: Any) -> None:
    return None


@dataclass
class StageInputs:
    """Upstream things a stage consumes: dataset manifests by role and an upstream export."""

    manifests: dict[str, str] = field(default_factory=dict)  # role ("pretrain"/"train"/"eval") -> URL
    upstream_export: str | None = None  # export directory URL from the previous stage


@dataclass
class StageResult:
    """What a stage hands to the next one and to the tracker."""

    export_url: str | None = None
    export_digest: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StageContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    work_dir: str = "."  # local scratch folder (checkpoints live here before being reported)
    output_url: str = "."  # fsspec URL where this stage's exports and reports go
    resume_dir: str | None = None  # a checkpoint folder to resume from, if the launcher has one
    # (metrics, checkpoint_dir or None): every rank calls it at the same steps (Ray Train's report is a barrier)
    report: Callable[[dict[str, float], str | None], None] = _ignore
    log_metrics: Callable[[dict[str, float], int], None] = _ignore  # (metrics, step), rank 0 only
    log_image: Callable[[Any, str], None] = _ignore  # (PIL image or PNG path, artifact file name)
    log_artifact: Callable[[str, str | None], None] = _ignore  # (local path, artifact sub-folder)
    set_tag: Callable[[str, str], None] = _ignore  # (key, value) on the stage run, rank 0 only
    fault_step: int | None = None  # test hook: this rank kills its own process at this step, once
    fault_marker: str | None = None  # file whose existence says the fault already happened
    # Ray Train collects reports when it polls workers (every 2 s), so a crash right after a report
    # would also lose that report; the Ray launcher waits this long before the injected crash.
    fault_delay_s: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def at_step(self, step: int) -> None:
        """Called by a stage after each optimizer step; fires the test fault hook at most once."""
        if self.fault_step is None or step != self.fault_step:
            return
        if self.fault_marker is None or os.path.exists(self.fault_marker):
            return
        os.makedirs(os.path.dirname(self.fault_marker) or ".", exist_ok=True)
        with open(self.fault_marker, "w") as marker:
            marker.write(f"killed rank {self.rank} at step {step}\n")
        logger.warning("test hook: killing rank %d at step %d", self.rank, step)
        time.sleep(self.fault_delay_s)
        os._exit(17)  # a hard crash, as a lost node would look: no cleanup, no exception handling

