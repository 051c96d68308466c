"""One machine, no Ray: run a job's stages in the processes of `accelerate launch` or `torchrun`.

    accelerate launch --multi_gpu --num_processes 8 -m pipeline.launch_local jobs/finetune.yaml
    torchrun --nproc_per_node 8 -m pipeline.launch_local jobs/finetune.yaml --stages finetune

Accelerate (or torchrun) only starts the processes and sets RANK/WORLD_SIZE/LOCAL_RANK; inside,
the DeepSpeed engine trains exactly as under Ray (Accelerate's own DeepSpeed plugin is not used:
it needs `transformers` and collapses to one rank on CPU). Rank 0 does what the Ray driver does —
fingerprints, stage caching, MLflow runs, lineage, the registry — through the same functions in
`pipeline.orchestrate`, so outputs and MLflow records are the same. A re-run resumes from the
checkpoints in `{output_root}/{stage}-{fingerprint}/work`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from pipeline.config import flatten_params
from pipeline.errors import PipelineError
from pipeline.orchestrate import (
    UPSTREAM,
    JobOutcome,
    StageOutcome,
    StageStart,
    absolute_url,
    begin_stage,
    dataset_manifests,
    finish_stage,
    join,
    manifest_digests,
    selected_stages,
)
from pipeline.ray_stage import STAGE_FUNCTIONS, resolve_function, write_result
from pipeline.stages.context import StageContext
from pipeline.tracking_sink import stage_sink

logger = logging.getLogger(__name__)


def stage_context(job, start: StageStart, tracker, rank: int, world_size: int, local_rank: int) -> StageContext:
    work_dir = join(absolute_url(start.output_url), "work")
    os.makedirs(work_dir, exist_ok=True)
    sink = stage_sink(tracker, start.run_id, enabled=(rank == 0))
    hooks = job.test_hooks
    armed = hooks.kill_stage == start.stage and hooks.kill_rank == rank and hooks.kill_at_step is not None
    return StageContext(
        rank=rank, world_size=world_size, local_rank=local_rank, work_dir=work_dir,
        output_url=start.output_url, resume_dir=None,  # the stage resumes from work_dir's latest checkpoint
        log_metrics=sink.log_metrics, log_image=sink.log_image, log_artifact=sink.log_artifact,
        fault_step=hooks.kill_at_step if armed else None,
        fault_marker=join(work_dir, ".fault-fired") if armed else None,
    )


def run_local(job, only: list[str] | None = None, job_file: str | None = None) -> JobOutcome | None:
    """Every rank calls this; rank 0 returns the outcome, the others None."""
    from pipeline import tracking
    from pipeline.engine import init_distributed
    from pipeline.stages.common import barrier, broadcast_from_rank0

    rank, world_size, local_rank = init_distributed()
    stages = selected_stages(job, only)
    tracker = tracking.prepare(job.mlflow) if rank == 0 else None
    output_root = absolute_url(job.output_root)
    setup = None
    if rank == 0:
        manifests = dataset_manifests(job, workers=0)  # in-process shard writing: no Ray here
        job_run_id = tracker.start_job_run(job.name, flatten_params(job),
                                           tags={"pipeline.job_file": job_file or "", "pipeline.launcher": "local"})
        setup = (manifests, manifest_digests(manifests), job_run_id)
    manifests, digests, job_run_id = broadcast_from_rank0(setup)
    outcome = JobOutcome(job_run_id, tracker.tracking_uri if tracker else "")
    status = "FAILED"
    try:
        for stage in stages:
            upstream = outcome.stages.get(UPSTREAM.get(stage, ""))
            start = None
            if rank == 0:
                start = begin_stage(job, stage, tracker, job_run_id, manifests, digests, upstream, output_root)
            start = broadcast_from_rank0(start)
            if isinstance(start, StageOutcome):
                outcome.stages[stage] = start
                continue
            ctx = stage_context(job, start, tracker, rank, world_size, local_rank)
            try:
                result = resolve_function(STAGE_FUNCTIONS[stage])(job, start.inputs, ctx)
            except BaseException:
                if rank == 0:
                    finish_stage(tracker, start, None, job)
                raise
            step = None
            if rank == 0:
                write_result(result, start.output_url)
                step = finish_stage(tracker, start, result, job)
            outcome.stages[stage] = broadcast_from_rank0(step)
            barrier()
        status = "FINISHED"
    finally:
        if rank == 0:
            tracker.finish_run(job_run_id, status)
    return outcome if rank == 0 else None


def run_ranked(body: Callable[[], None]) -> int:
    """The main() of a per-rank launcher: readable per-rank logs, one-line user errors, clean teardown."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    try:
        body()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    from pipeline.commands._job_args import add_job_arguments, load
    from pipeline.commands.run import summary

    parser = argparse.ArgumentParser(prog="python -m pipeline.launch_local", description=__doc__.split("\n\n")[0])
    add_job_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        job, stages = load(args)
        outcome = run_local(job, stages, job_file=args.job)
        if outcome is not None:
            print(summary(outcome), flush=True)

    return run_ranked(body)


if __name__ == "__main__":
    sys.exit(main())
