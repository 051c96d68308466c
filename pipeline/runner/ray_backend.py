"""The Ray backend: each stage on a Ray Train `TorchTrainer` (Ray Train V2 API), from a driver process.

Every worker builds its StageContext with `build_context`: checkpoints go through `ray.train.report`
(Ray merges the ranks' folders into one in `{output_root}/ray`, keeping the stage's
`checkpoint.keep_last`), a new worker group resumes from `ray.train.get_checkpoint()`. The trial is
named `{job}-{stage}-{fingerprint[:12]}`, so a re-run after a crashed driver resumes its
checkpoints. Retries are the driver's: a lost worker or node gets a new worker group (up to
`scaling.max_failures` times), a fault that would fail again (a PipelineError: corrupt data, bad
settings, missing inputs; missing credentials) fails the stage at once — the worker that hit it
leaves `.fatal-error.json` beside the outputs; an object-store outage (`StorageUnavailable`) is
retried like a lost worker. Rank 0 writes the StageResult as result.json there,
where the driver reads it back from any node. Per-rank scratch folders are removed when the worker ends.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import fsspec

from pipeline.config import JobConfig
from pipeline.console import configure_logging, log_file_for
from pipeline.data.fsutil import absolute_url, join_url
from pipeline.errors import PipelineError
from pipeline.runner.context import FAULT_ENV, StageLaunch, build_context
from pipeline.runner.resolve import StagePlan
from pipeline.stages.context import StageResult
from pipeline.stages.table import STAGES
from pipeline.tracking_sink import close_sinks

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
FATAL_FILE = ".fatal-error.json"  # written by the worker that hit a fault a retry cannot fix
FAULT_DELAY_S = 5.0  # > Ray Train's 2 s health-check poll, so the last report is registered first

# Environment a worker needs to reach the same MLflow store, storage and settings as the driver.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", FAULT_ENV,
)


def connect_ray(job: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        logger.info("no RAY_ADDRESS: starting a local Ray")
        ray.init()


def write_json(url: str, value: dict[str, Any]) -> None:
    """Under a temporary name first, then moved: a reader never sees half of it."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
    fs.mv(tmp, path)


def read_json(url: str) -> dict[str, Any]:
    with fsspec.open(url) as handle:
        return json.load(handle)


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker process."""
    import ray.train

    os.environ.update(config["env"])
    train_ctx = ray.train.get_context()
    rank = train_ctx.get_world_rank()
    job = JobConfig.model_validate(config["job"])
    configure_logging(rank, log_file_for(job.output_root, job.name, f"rank{rank}"))  # rank 0 prints progress
    launch: StageLaunch = config["launch"]
    work_dir = scratch_dir(config["trial_name"], rank)
    try:
        resume_dir = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            resume_dir = checkpoint.to_directory(os.path.join(work_dir, "resume"))
            logger.info("rank %d resumes %s from %s", rank, launch.stage, resume_dir)

        def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)

        ctx = build_context(launch, rank=rank, world_size=train_ctx.get_world_size(),
                            local_rank=train_ctx.get_local_rank(), work_dir=work_dir,
                            marker_dir=config["marker_dir"], resume_dir=resume_dir, report=report,
                            fault_delay_s=FAULT_DELAY_S)
        try:
            result = STAGES[launch.stage].run(job, launch.inputs, ctx)
        except Exception as err:
            if is_deterministic(err):  # the same bytes or settings fail again: tell the driver not to retry
                write_json(join_url(launch.output_url, FATAL_FILE), {"rank": rank, "error": str(err)})
            raise
        if rank == 0:
            write_json(join_url(launch.output_url, RESULT_FILE), result.__dict__)
    finally:
        close_sinks()  # rank 0's queued metrics: sent (bounded wait) or journaled for the driver
        shutil.rmtree(work_dir, ignore_errors=True)  # the resume state lives in Ray's storage


def scratch_dir(trial_name: str, rank: int) -> str:
    """This rank's scratch folder; folders an earlier, killed attempt of the same rank left are removed."""
    root = tempfile.gettempdir()
    prefix = f"{trial_name}-rank{rank}-"
    for name in os.listdir(root):
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=prefix, dir=root)


def is_deterministic(err: BaseException) -> bool:
    """Faults a retry cannot fix: our own errors (corrupt data, bad settings, missing inputs) and
    missing storage credentials. Lost workers and nodes surface as other errors and are retried, as
    is a PipelineError marked `retryable` (an object store that did not answer: StorageUnavailable)."""
    if isinstance(err, PipelineError):
        return not err.retryable
    return type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError")


class RayBackend:
    name = "ray"
    shard_workers = None  # shards are written as Ray tasks

    def start(self, job: JobConfig) -> None:
        connect_ray(job)

    def launch(self, job: JobConfig, plan: StagePlan, launch: StageLaunch) -> StageResult:
        """Run the stage on N Ray Train workers. A lost worker or node is retried (up to
        scaling.max_failures times) by a new worker group that resumes from the last reported
        checkpoint, as is a trial left by a crashed driver; a deterministic fault fails at once."""
        scaling = job.scaling
        fatal = join_url(launch.output_url, FATAL_FILE)
        for attempt in itertools.count(1):
            _remove(fatal)
            try:
                launch.tracker.set_tags(launch.run_id, {"pipeline.attempts": str(attempt)})
            except Exception as err:  # noqa: BLE001 - a count for the record; the stage goes on without it
                logger.warning("stage %s: could not record attempt %d in MLflow: %s", plan.stage, attempt, err)
            logger.info("stage %s: %d Ray Train workers, trial %s, attempt %d", plan.stage, scaling.num_workers,
                        plan.trial_name, attempt)
            try:
                self._trainer(job, plan, launch).fit()
                return StageResult(**read_json(join_url(launch.output_url, RESULT_FILE)))
            except Exception as err:  # Ray wraps worker errors; keep the root cause in one line
                if _exists(fatal):
                    raise PipelineError(f"stage {plan.stage}: {read_json(fatal)['error']}") from None
                if scaling.max_failures != -1 and attempt > scaling.max_failures:
                    raise PipelineError(f"stage {plan.stage} failed on Ray Train (trial {plan.trial_name}, "
                                        f"{attempt} attempt(s)): {_root_cause(err)}") from err
                logger.warning("stage %s: attempt %d failed (%s); retrying from the last checkpoint",
                               plan.stage, attempt, _root_cause(err))
        raise AssertionError("unreachable")

    def _trainer(self, job: JobConfig, plan: StagePlan, launch: StageLaunch):
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        scaling = job.scaling
        storage_path = join_url(absolute_url(job.output_root), "ray")
        resources = {"CPU": scaling.cpus_per_worker}
        if scaling.use_gpu:
            resources["GPU"] = scaling.gpus_per_worker or 1
        settings = STAGES[plan.stage].settings(job)
        keep = settings.checkpoint.keep_last if hasattr(settings, "checkpoint") else None
        config = {
            "job": job.model_dump(mode="json"),
            "launch": launch,
            "trial_name": plan.trial_name,
            "marker_dir": join_url(storage_path, plan.trial_name),
            "env": {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ},
        }
        return TorchTrainer(
            _worker_loop,
            train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=plan.trial_name, storage_path=storage_path,
                # the driver decides about retries (see launch): Ray Train itself never restarts the group
                failure_config=FailureConfig(max_failures=0),
                checkpoint_config=CheckpointConfig(num_to_keep=keep),
                # Ray Train's controller internals stay in its session log files (they get every level)
                logging_config=LoggingConfig(log_level="WARNING"),
                # read by DeepSpeed at import (before our logging setup): no "Setting accelerator to CPU"
                worker_runtime_env=None if scaling.use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}},
            ),
        )


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
