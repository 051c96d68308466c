"""`python -m pipeline submit JOB.yaml`: send `python -m pipeline run JOB.yaml` to a Ray cluster.

This is the Ray Job Submission SDK form of
`ray job submit --working-dir . -- python -m pipeline run JOB.yaml`: the working directory (and
any runtime_env from the spec's `ray:` block) is uploaded, the driver runs on the cluster, and this
command prints the job id and how to follow its logs.
"""

from __future__ import annotations

import argparse
import os
import shlex

from pipeline.commands._job_args import add_job_arguments, load
from pipeline.errors import PipelineError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--address", default=None,
                        help="Ray dashboard URL, e.g. http://head:8265 (default: spec ray.address, else RAY_ADDRESS)")
    parser.add_argument("--submission-id", default=None, help="job id to use (re-using one resumes nothing by itself)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")


def entrypoint(args: argparse.Namespace) -> str:
    words = ["python", "-m", "pipeline", "run", args.job]
    for override in args.overrides:
        words += ["--set", override]
    if args.stages:
        words += ["--stages", args.stages]
    return shlex.join(words)


def main(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    job, _ = load(args)  # validate locally before uploading anything
    address = args.address or job.ray.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise PipelineError("no Ray cluster address: pass --address http://HEAD:8265, set ray.address or RAY_ADDRESS")
    runtime_env = {"working_dir": job.ray.working_dir, **job.ray.runtime_env}
    forwarded = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}
    if forwarded:
        runtime_env["env_vars"] = {**forwarded, **runtime_env.get("env_vars", {})}
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint(args), runtime_env=runtime_env,
                                   submission_id=args.submission_id)
    except Exception as err:  # connection refused, bad runtime_env, ...: one line for the user
        raise PipelineError(f"Ray job submission to {address} failed: {err}") from err
    print(f"submitted Ray job {job_id} to {address}")
    print(f"follow its logs: ray job logs --follow --address {address} {job_id}")
    if not args.wait:
        return 0
    status = wait_for(client, job_id)
    print(f"Ray job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def wait_for(client, job_id: str, poll_s: float = 2.0):
    import time

    from ray.job_submission import JobStatus

    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(poll_s)
