"""What every rank needs to run one stage, and the one function that turns it into a StageContext.

The test fault hook lives here, outside the job spec: PIPELINE_TEST_FAULT="<stage>:<rank>:<step>"
makes that rank of that stage kill its own process right after that optimizer step, once per
marker folder (so the re-run that follows does not fire it again).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.data.fsutil import join_url
from pipeline.errors import PipelineError
from pipeline.stages.context import StageContext, StageInputs
from pipeline.tracking import Tracker
from pipeline.tracking_sink import stage_sink

FAULT_ENV = "PIPELINE_TEST_FAULT"
FAULT_MARKER = ".fault-fired"


@dataclass(frozen=True)
class StageLaunch:
    """Picklable: sent from the driver (or rank 0) to every rank."""

    stage: str
    run_id: str
    inputs: StageInputs
    output_url: str
    tracker: Tracker


def fault_at(stage: str, rank: int) -> int | None:
    """The step at which this rank of this stage is to crash, from PIPELINE_TEST_FAULT."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    try:
        fault_stage, fault_rank, step = value.split(":")
        fault_rank_i, step_i = int(fault_rank), int(step)
    except ValueError:
        raise PipelineError(f"{FAULT_ENV}={value!r}: expected <stage>:<rank>:<step>, e.g. finetune:1:3") from None
    return step_i if (fault_stage, fault_rank_i) == (stage, rank) else None


def build_context(launch: StageLaunch, *, rank: int, world_size: int, local_rank: int, work_dir: str,
                  marker_dir: str, resume_dir: str | None = None,
                  report: Callable[[dict[str, float], str | None], None] | None = None,
                  fault_delay_s: float = 0.0) -> StageContext:
    sink = stage_sink(launch.tracker, launch.run_id, enabled=(rank == 0))
    fault_step = fault_at(launch.stage, rank)
    extra = {"report": report} if report is not None else {}
    return StageContext(
        rank=rank, world_size=world_size, local_rank=local_rank, work_dir=work_dir, output_url=launch.output_url,
        resume_dir=resume_dir, log_metrics=sink.log_metrics, log_image=sink.log_image,
        log_artifact=sink.log_artifact, set_tag=sink.set_tag, fault_step=fault_step,
        fault_marker=join_url(marker_dir, FAULT_MARKER) if fault_step is not None else None,
        fault_delay_s=fault_delay_s, **extra,
    )
