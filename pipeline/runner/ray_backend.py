"""The Ray backend: each stage on a Ray Train `TorchTrainer` (Ray Train V2 API), from a driver process.

Every worker builds its StageContext with `build_context`: checkpoints go through `ray.train.report`
(Ray merges the ranks' folders into one in `{output_root}/ray`), a restarted worker group resumes
from `ray.train.get_checkpoint()`, and `FailureConfig(max_failures)` says how many restarts a stage
gets. The trial is named `{job}-{stage}-{fingerprint[:12]}`, so a re-run after a crashed driver
resumes its checkpoints. Rank 0 writes the StageResult as result.json beside the stage's outputs,
where the driver reads it back from any node.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import fsspec

from pipeline.config import JobConfig
from pipeline.data.fsutil import absolute_url, join_url
from pipeline.errors import PipelineError
from pipeline.runner.context import FAULT_ENV, StageLaunch, build_context
from pipeline.runner.resolve import StagePlan
from pipeline.stages.context import StageResult
from pipeline.stages.table import STAGES

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
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


def write_result(result: StageResult, output_url: str) -> None:
    """result.json under a temporary name first, then moved: a reader never sees half of it."""
    fs, path = fsspec.core.url_to_fs(output_url)
    fs.makedirs(path, exist_ok=True)
    tmp = f"{path}/.{RESULT_FILE}.tmp"
    with fs.open(tmp, "w") as handle:
        json.dump(result.__dict__, handle, indent=2, sort_keys=True)
    fs.mv(tmp, f"{path}/{RESULT_FILE}")


def read_result(output_url: str) -> StageResult:
    fs, path = fsspec.core.url_to_fs(output_url)
    with fs.open(f"{path}/{RESULT_FILE}") as handle:
        return StageResult(**json.load(handle))


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker process."""
    import ray.train

    os.environ.update(config["env"])
    train_ctx = ray.train.get_context()
    rank = train_ctx.get_world_rank()
    job = JobConfig.model_validate(config["job"])
    launch: StageLaunch = config["launch"]
    work_dir = tempfile.mkdtemp(prefix=f"{launch.stage}-rank{rank}-")
    resume_dir = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory(os.path.join(work_dir, "resume"))
        logger.info("rank %d resumes %s from %s", rank, launch.stage, resume_dir)

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    ctx = build_context(launch, rank=rank, world_size=train_ctx.get_world_size(),
                        local_rank=train_ctx.get_local_rank(), work_dir=work_dir, marker_dir=config["marker_dir"],
                        resume_dir=resume_dir, report=report, fault_delay_s=FAULT_DELAY_S)
    result = STAGES[launch.stage].run(job, launch.inputs, ctx)
    if rank == 0:
        write_result(result, launch.output_url)


class RayBackend:
    name = "ray"
    shard_workers = None  # shards are written as Ray tasks

    def start(self, job: JobConfig) -> None:
        connect_ray(job)

    def launch(self, job: JobConfig, plan: StagePlan, launch: StageLaunch) -> StageResult:
        """Run the stage on N Ray Train workers; resumes a same-named trial left by a crashed driver."""
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        scaling = job.scaling
        storage_path = join_url(absolute_url(job.output_root), "ray")
        resources = {"CPU": scaling.cpus_per_worker}
        if scaling.use_gpu:
            resources["GPU"] = scaling.gpus_per_worker or 1
        config = {
            "job": job.model_dump(mode="json"),
            "launch": launch,
            "marker_dir": join_url(storage_path, plan.trial_name),
            "env": {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ},
        }
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=plan.trial_name, storage_path=storage_path,
                                 failure_config=FailureConfig(max_failures=scaling.max_failures)),
        )
        logger.info("stage %s: %d Ray Train workers, trial %s", plan.stage, scaling.num_workers, plan.trial_name)
        try:
            trainer.fit()
        except Exception as err:  # Ray wraps worker errors; keep the root cause in one line
            raise PipelineError(f"stage {plan.stage} failed on Ray Train (trial {plan.trial_name}): "
                                f"{_root_cause(err)}") from err
        return read_result(launch.output_url)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
