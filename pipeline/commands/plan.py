"""`python -m pipeline plan JOB.yaml`: the stage graph, fingerprints and what would be skipped."""

from __future__ import annotations

import argparse

from pipeline.commands._job_args import add_job_arguments, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from pipeline.orchestrate import UPSTREAM, plan_job

    job, stages = load(args)
    print(f"job {job.name}: {job.model.variant}, {job.scaling.num_workers} worker(s), output {job.output_root}")
    if job.data.build is not None:
        print(f"  shards     build {job.data.build.source} {','.join(job.data.build.splits)} (Ray tasks)")
    for planned in plan_job(job, stages):
        after = f" <- {UPSTREAM[planned.stage]}" if planned.stage in UPSTREAM else ""
        fingerprint = planned.fingerprint[:12] if planned.fingerprint else "-" * 12
        print(f"  {planned.stage:<10} {fingerprint}  {planned.status}{after}")
    return 0
