"""`python -m pipeline submit JOB.yaml`: send `python -m pipeline run JOB.yaml` to a Ray cluster.

This is the Ray Job Submission SDK form of
`ray job submit --working-dir . -- python -m pipeline run JOB.yaml`: the working directory (and
any runtime_env from the spec's `ray:` block) is uploaded, the driver runs on the cluster, and this
command prints the job id and how to follow its logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

from pipeline.commands._job_args import add_job_arguments, load
from pipeline.config import JobConfig
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--address", default=None,
                        help="Ray dashboard URL, e.g. http://head:8265 (default: spec ray.address, else RAY_ADDRESS)")
    parser.add_argument("--submission-id", default=None, help="job id to use (re-using one resumes nothing by itself)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")


def entrypoint(args: argparse.Namespace, job: JobConfig, address: str, cwd: str | None = None,
               env: Mapping[str, str] | None = None) -> str:
    """`python -m pipeline run JOB.yaml --set ...`. The driver runs in Ray's temporary copy of the working
    directory, so relative record locations (MLflow store, output_root) would vanish with it: for a head
    on this machine they are passed as absolute paths of the submitting folder; for a remote head, where
    this machine's folders mean nothing, they are refused."""
    from pipeline.runner.preflight import absolute_overrides, relative_locations

    words = ["python", "-m", "pipeline", "run", args.job]
    for override in args.overrides:
        words += ["--set", override]
    relative = relative_locations(job, env)
    if relative and not is_this_machine(address):
        named = ", ".join(f"{key}={value}" for key, value in relative.items())
        raise PipelineError(
            f"{named}: relative, so on the Ray head at {address} they would land in Ray's temporary working "
            f"directory, which Ray deletes; set them to locations the cluster shares (s3://..., an MLflow "
            f"server http://...), e.g. --set output_root=s3://bucket/runs")
    for key, value in absolute_overrides(relative, cwd or os.getcwd()).items():
        logger.info("submit: %s=%s (the head is this machine; relative paths would land in Ray's copy)", key, value)
        words += ["--set", f"{key}={value}"]  # after the user's: the last --set of a key wins
    if args.stages:
        words += ["--stages", args.stages]
    return shlex.join(words)


def is_this_machine(address: str) -> bool:
    """A Ray address (http://host:8265, host:6379, ray://host:10001, auto) that points at this machine:
    its host resolves to an address a socket here can bind (loopback, this machine's interfaces)."""
    if address in ("auto", "local"):
        return True
    host = urlsplit(address if "://" in address else f"//{address}").hostname
    if not host:
        return False
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False  # unresolvable here: not this machine
    for family, kind, _, _, sockaddr in found:
        with socket.socket(family, kind) as probe:
            try:
                probe.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


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
    command = entrypoint(args, job, address)  # before connecting: a refusal needs no cluster
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=args.submission_id)
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
