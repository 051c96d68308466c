"""Helpers shared by the tracking tests: the run chain the orchestrator writes and a free port.

A plain module, because importing from conftest.py is ambiguous when several test folders have one.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from pipeline.tracking import Tracker

PRETRAIN_DIGEST = "a" * 64
TRAIN_DIGEST = "b" * 64
VAL_DIGEST = "c" * 64
PRETRAIN_URL = "memory://digits/pretrain/manifest.json"
TRAIN_URL = "s3://bucket/digits/train/manifest.json"
VAL_URL = "file:///data/digits/val/manifest.json"


@dataclass
class Chain:
    job: str
    pretrain: str
    finetune: str
    evaluate: str
    pretrain_export_uri: str
    finetune_export_uri: str


def write_chain(tracker: Tracker, export_dir: Path) -> Chain:
    """What the orchestrator writes for one job: a parent run and three linked stage runs."""
    job = tracker.start_job_run("quick", params={"seed": 0})

    pretrain = tracker.start_stage_run(job, "pretrain", "fp-pre", params={"mask_ratio": 0.6})
    tracker.log_dataset(pretrain, PRETRAIN_URL, PRETRAIN_DIGEST, context="pretrain")
    for step in (1, 2, 3):
        tracker.log_metrics(pretrain, {"loss": 1.0 / step, "lr": 1e-3}, step=step)
    pretrain_export = tracker.log_artifacts(pretrain, export_dir, "export")
    tracker.finish_run(pretrain)

    finetune = tracker.start_stage_run(job, "finetune", "fp-fine", params={"epochs": 1})
    tracker.set_upstream(finetune, pretrain, pretrain_export)
    tracker.log_dataset(finetune, TRAIN_URL, TRAIN_DIGEST, context="train")
    tracker.log_dataset(finetune, VAL_URL, VAL_DIGEST, context="val", primary=False)
    finetune_export = tracker.log_artifacts(finetune, export_dir, "export")
    tracker.finish_run(finetune)

    evaluate = tracker.start_stage_run(job, "evaluate", "fp-eval")
    tracker.set_upstream(evaluate, finetune, finetune_export)
    tracker.log_dataset(evaluate, VAL_URL, VAL_DIGEST, context="val")
    tracker.log_metrics(evaluate, {"top1": 0.93, "energy_mj": 0.4})
    tracker.finish_run(evaluate)
    tracker.finish_run(job)
    return Chain(job, pretrain, finetune, evaluate, pretrain_export, finetune_export)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_from_worker(tracker: Tracker, run_id: str, rank: int) -> None:
    """What rank 0 of a Ray stage does, run in a fresh (spawned) process with a pickled Tracker."""
    for step in range(20):
        tracker.log_metrics(run_id, {"loss": float(step), "rank": float(rank)}, step=step)
    tracker.finish_run(run_id)
