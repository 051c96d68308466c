"""`python -m pipeline local JOB.yaml`: the job's stages in the processes torchrun or `accelerate launch`
started on one machine (no Ray), with the same fingerprints, MLflow records and outputs as `run`.

Accelerate (or torchrun) only starts the processes and sets RANK/WORLD_SIZE/LOCAL_RANK; inside, the
DeepSpeed engine trains exactly as under Ray (Accelerate's own DeepSpeed plugin is not used: it needs
`transformers` and collapses to one rank on CPU). See pipeline.runner.local_backend.
"""

from __future__ import annotations

import argparse

from pipeline.commands._job_args import add_job_arguments, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from pipeline.errors import PipelineError
    from pipeline.runner.preflight import check_output_root

    job, stages = load(args)
    if job.sweep is not None:
        raise PipelineError(f"{args.job}: sweep: sweeps run under `python -m pipeline run` (Ray), not `local`")
    check_output_root(job)  # before the log file goes there, and before torch and DeepSpeed load

    import torch.distributed as dist

    from pipeline.commands.run import summary
    from pipeline.runner.local_backend import run_local

    try:
        outcome = run_local(job, stages, job_file=args.job)
        if outcome is not None:
            print(summary(outcome), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
