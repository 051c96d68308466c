"""Run one stage function on a Ray Train `TorchTrainer` (Ray Train V2 API).

The driver calls `run_stage_on_ray`; every worker builds a StageContext wired to Ray Train:
checkpoints go through `ray.train.report` (Ray merges the ranks' ZeRO shards into one folder in
`storage_path`), a restarted worker group resumes from `ray.train.get_checkpoint()`, and
`FailureConfig(max_failures)` decides how many restarts a stage gets. Rank 0 writes the stage's
result as JSON next to its exports so the driver can read it back from any node.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import fsspec

from pipeline.config import JobConfig
from pipeline.errors import PipelineError
from pipeline.stages.context import StageContext, StageInputs, StageResult
from pipeline.tracking import Tracker

logger = logging.getLogger(__name__)

STAGE_FUNCTIONS = {
    "pretrain": "pipeline.stages.pretrain:run",
    "finetune": "pipeline.stages.finetune:run",
    "evaluate": "pipeline.stages.evaluate:run",
}
RESULT_FILE = "result.json"
FAULT_DELAY_S = 5.0  # > Ray Train's 2 s health-check poll, so the last report is registered first

# Environment a worker needs to reach the same MLflow store and Ray settings as the driver.
_FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL_S3",
    "FSSPEC_S3_ENDPOINT_URL",
)


def resolve_function(spec: str) -> Callable[..., StageResult]:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def write_result(result: StageResult, output_url: str) -> None:
    """Write result.json atomically enough for readers: temp name first, then move."""
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
    from pipeline.tracking_sink import stage_sink  # rank-0 MLflow logging callbacks

    train_ctx = ray.train.get_context()
    rank = train_ctx.get_world_rank()
    job = JobConfig.model_validate(config["job"])
    inputs = StageInputs(**config["inputs"])
    work_dir = tempfile.mkdtemp(prefix=f"{config['stage']}-rank{rank}-")

    resume_dir = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory(os.path.join(work_dir, "resume"))
        logger.info("rank %d resumes %s from %s", rank, config["stage"], resume_dir)

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    sink = stage_sink(config["tracker"], config["run_id"], enabled=(rank == 0))
    hooks = config.get("fault") or {}
    ctx = StageContext(
        rank=rank,
        world_size=train_ctx.get_world_size(),
        local_rank=train_ctx.get_local_rank(),
        work_dir=work_dir,
        output_url=config["output_url"],
        resume_dir=resume_dir,
        report=report,
        log_metrics=sink.log_metrics,
        log_image=sink.log_image,
        log_artifact=sink.log_artifact,
        fault_step=hooks.get("step") if hooks.get("rank") == rank else None,
        fault_marker=hooks.get("marker"),
        fault_delay_s=FAULT_DELAY_S,
    )
    result = resolve_function(config["function"])(job, inputs, ctx)
    if rank == 0:
        write_result(result, config["output_url"])


def run_stage_on_ray(
    job: JobConfig,
    stage: str,
    inputs: StageInputs,
    *,
    run_id: str | None,
    tracker: Tracker | None,
    output_url: str,
    storage_path: str,
    trial_name: str,
    function: str | None = None,
) -> StageResult:
    """Run `stage` on N Ray Train workers; resumes a same-named trial left by a crashed driver."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = job.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    fault = None
    hooks = job.test_hooks
    if hooks.kill_stage == stage and hooks.kill_at_step is not None:
        fault = {"rank": hooks.kill_rank, "step": hooks.kill_at_step,
                 "marker": os.path.join(storage_path, trial_name + ".fault-fired")}
    config = {
        "job": job.model_dump(mode="json"),
        "stage": stage,
        "function": function or STAGE_FUNCTIONS[stage],
        "inputs": inputs.__dict__,
        "run_id": run_id,
        "tracker": tracker,
        "output_url": output_url,
        "fault": fault,
        "env": {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ},
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=trial_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
    )
    logger.info("stage %s: %d Ray Train workers, trial %s", stage, scaling.num_workers, trial_name)
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps worker errors; keep the root cause in one line
        cause = _root_cause(err)
        raise PipelineError(f"stage {stage} failed on Ray Train (trial {trial_name}): {cause}") from err
    return read_result(output_url)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
