"""The bare stage runner: stages on one machine under torchrun, with no Ray, MLflow or stage cache.

pipeline.launch_local is the full local launcher (MLflow runs, lineage, fingerprints); this one only
writes files, which is what the stage tests and benchmarks/digits_chain.py need:

    torchrun --nproc_per_node 2 -m pipeline.stages.torchrun JOB.yaml \
        [--stages pretrain,finetune,evaluate] [--out DIR] [--set key.path=value ...]

Every rank builds its StageContext from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). Per
stage, in {out}/{stage} (out defaults to the job's output_root):
- work/: checkpoints, shared by the node's ranks; running the same command again resumes from them;
- export/ and the stage's reports (the stage writes them); result.json (the StageResult, rank 0);
- metrics.jsonl (ctx.log_metrics, rank 0), images/ (ctx.log_image), artifacts/ (ctx.log_artifact),
  reports.jsonl (one line per ctx.report call and rank: metrics + files of the reported checkpoint).
A stage's upstream export comes from the previous stage of this run, else from its result.json of an
earlier run. Shards: data.train/val/pretrain manifests, or data.build (rank 0 writes them in-process
into build.dest or {out}/shards). job.test_hooks (kill_stage, kill_rank, kill_at_step) arm the fault
hook once per output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from typing import Any

from pipeline.config import JobConfig
from pipeline.orchestrate import UPSTREAM, selected_stages
from pipeline.ray_stage import RESULT_FILE, STAGE_FUNCTIONS, read_result, resolve_function, write_result
from pipeline.stages.context import StageContext, StageInputs, StageResult

logger = logging.getLogger(__name__)



def _append_json(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def _listing(folder: str | None) -> list[str]:
    if not folder:
        return []
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def build_context(job: JobConfig, stage: str, stage_dir: str, rank: int, world_size: int,
                  local_rank: int) -> StageContext:
    images, artifacts = os.path.join(stage_dir, "images"), os.path.join(stage_dir, "artifacts")

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        _append_json(os.path.join(stage_dir, "reports.jsonl"),
                     {"rank": rank, "metrics": metrics, "checkpoint_files": _listing(checkpoint_dir)})

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        if rank == 0:
            _append_json(os.path.join(stage_dir, "metrics.jsonl"), {"step": step, **metrics})

    def log_image(image: Any, name: str) -> None:
        if rank == 0:
            os.makedirs(images, exist_ok=True)
            if isinstance(image, str):
                shutil.copyfile(image, os.path.join(images, name))
            else:
                image.save(os.path.join(images, name))

    def log_artifact(path: str, subdir: str | None) -> None:
        if rank == 0:
            target = os.path.join(artifacts, subdir or "")
            os.makedirs(target, exist_ok=True)
            shutil.copyfile(path, os.path.join(target, os.path.basename(path)))

    hooks = job.test_hooks
    armed = hooks.kill_stage == stage and hooks.kill_rank == rank and hooks.kill_at_step is not None
    return StageContext(
        rank=rank, world_size=world_size, local_rank=local_rank, work_dir=os.path.join(stage_dir, "work"),
        output_url=stage_dir, resume_dir=None, report=report, log_metrics=log_metrics, log_image=log_image,
        log_artifact=log_artifact, fault_step=hooks.kill_at_step if armed else None,
        fault_marker=os.path.join(stage_dir, ".fault-fired") if armed else None,
    )


def resolve_manifests(job: JobConfig, out: str, rank: int) -> dict[str, str]:
    """Role -> manifest URL; builds shards first (rank 0, in-process) when data.build asks for them."""
    from pipeline.stages.common import barrier

    data = job.data
    train, val = data.train, data.val
    if data.build is not None and (train is None or val is None):
        from pipeline.data.fsutil import join_url
        from pipeline.data.manifest import manifest_name
        from pipeline.data.writer import write_shards

        dest = data.build.dest or os.path.join(out, "shards")
        if rank == 0:
            for split in data.build.splits:
                write_shards(data.build.source, dest, split=split, root=data.build.root,
                             shard_max_count=data.build.shard_max_count, shard_max_mb=data.build.shard_max_mb,
                             seed=job.seed, workers=0, progress=False, **data.build.options)
        barrier()
        train = train or join_url(dest, manifest_name("train"))
        val = val or join_url(dest, manifest_name("val"))
    manifests = {"train": train, "eval": val, "pretrain": data.pretrain or train}
    return {role: url for role, url in manifests.items() if url}


def run_stages(job: JobConfig, stages: list[str], out: str) -> dict[str, StageResult]:
    from pipeline.engine import init_distributed

    rank, world_size, local_rank = init_distributed()
    manifests = resolve_manifests(job, out, rank)
    results: dict[str, StageResult] = {}
    for stage in stages:
        stage_dir = os.path.join(out, stage)
        os.makedirs(os.path.join(stage_dir, "work"), exist_ok=True)
        upstream = None
        if stage in UPSTREAM:
            before = UPSTREAM[stage]
            if before in results:
                upstream = results[before].export_url
            elif os.path.exists(os.path.join(out, before, RESULT_FILE)):
                upstream = read_result(os.path.join(out, before)).export_url
        ctx = build_context(job, stage, stage_dir, rank, world_size, local_rank)
        logger.info("rank %d: stage %s -> %s (upstream %s)", rank, stage, stage_dir, upstream)
        result = resolve_function(STAGE_FUNCTIONS[stage])(job, StageInputs(manifests, upstream), ctx)
        if rank == 0:
            write_result(result, stage_dir)
            print(f"{stage}: {json.dumps(result.metrics, default=float)}", flush=True)
        results[stage] = result
    return results


def main(argv: list[str] | None = None) -> int:
    from pipeline.commands._job_args import add_job_arguments, load
    from pipeline.launch_local import run_ranked

    parser = argparse.ArgumentParser(prog="pipeline.stages.torchrun", description=__doc__.split("\n\n")[0])
    add_job_arguments(parser)
    parser.add_argument("--out", default=None, help="output folder (default: the job's output_root)")
    args = parser.parse_args(argv)

    def body() -> None:
        job, stages = load(args)
        run_stages(job, selected_stages(job, stages), args.out or job.output_root)

    return run_ranked(body)


if __name__ == "__main__":
    sys.exit(main())
