"""The local backend: stages in the processes that torchrun or `accelerate launch` started (no Ray).

Rank 0 runs the job loop (pipeline.runner.job) exactly as the Ray driver does — fingerprints, stage
cache, MLflow runs, lineage, registry — and sends each stage's StageLaunch to the other ranks, which
follow. Every rank then runs the stage in-process with a context from `build_context`. Checkpoints
live in `{output_url}/work`, shared by the node's ranks, so a re-run resumes from them. Shards are
written in-process by rank 0.
"""

from __future__ import annotations

import logging
import os

from pipeline.config import JobConfig
from pipeline.console import configure_logging, log_file_for
from pipeline.data.fsutil import absolute_url, join_url
from pipeline.runner.context import StageLaunch, build_context
from pipeline.runner.job import JobOutcome, run_job
from pipeline.runner.resolve import StagePlan
from pipeline.stages.context import StageResult
from pipeline.stages.table import STAGES
from pipeline.tracking_sink import close_sinks
from pipeline.train.collectives import barrier, broadcast_from_rank0
from pipeline.train.distributed import init_distributed

logger = logging.getLogger(__name__)

_DONE, _FAILED = "done", "failed"


class LocalBackend:
    name = "local"
    shard_workers = 0  # rank 0 writes shards in-process

    def __init__(self, rank: int, world_size: int, local_rank: int) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.in_stage = False  # a failure inside a stage leaves the followers in a collective

    def start(self, job: JobConfig) -> None:
        pass

    def launch(self, job: JobConfig, plan: StagePlan, launch: StageLaunch) -> StageResult:
        broadcast_from_rank0(launch)  # the followers run it too
        self.in_stage = True
        result = run_here(job, launch, self.rank, self.world_size, self.local_rank)
        barrier()
        self.in_stage = False
        return result


def run_here(job: JobConfig, launch: StageLaunch, rank: int, world_size: int, local_rank: int) -> StageResult:
    work_dir = join_url(absolute_url(launch.output_url), "work")
    os.makedirs(work_dir, exist_ok=True)
    ctx = build_context(launch, rank=rank, world_size=world_size, local_rank=local_rank, work_dir=work_dir,
                        marker_dir=work_dir)
    try:
        return STAGES[launch.stage].run(job, launch.inputs, ctx)
    finally:
        close_sinks()  # rank 0's queued metrics: sent (bounded wait) or journaled before the run is ended


def run_local(job: JobConfig, only: list[str] | None = None, job_file: str | None = None) -> JobOutcome | None:
    """Every rank calls this; rank 0 returns the job's outcome, the others None."""
    rank, world_size, local_rank = init_distributed()
    configure_logging(rank, log_file_for(job.output_root, job.name, f"rank{rank}"))  # rank 0 prints progress
    if job.scaling.num_workers != world_size:  # the launcher decided: fingerprints and batches follow it
        job = job.model_copy(update={"scaling": job.scaling.model_copy(update={"num_workers": world_size})})
    if rank != 0:
        follow(job, rank, world_size, local_rank)
        return None
    backend, status = LocalBackend(rank, world_size, local_rank), _FAILED
    try:
        outcome = run_job(job, backend, only, job_file)
        status = _DONE
        return outcome
    finally:
        if not backend.in_stage:  # inside a stage, the launcher tears the followers down when rank 0 exits
            broadcast_from_rank0(status)


def follow(job: JobConfig, rank: int, world_size: int, local_rank: int) -> None:
    while True:
        message = broadcast_from_rank0(None)
        if message == _DONE:
            return
        if message == _FAILED:
            raise SystemExit(2)  # rank 0 failed before a stage and printed why
        run_here(job, message, rank, world_size, local_rank)
        barrier()
