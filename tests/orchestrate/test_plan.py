"""`plan` decisions without running anything: fingerprints, cache status, an unreachable MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_job
from pipeline.data.writer import write_shards
from pipeline.runner.plan import plan_job

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("plan-shards")
    for split in ("train", "val"):
        write_shards("digits", str(dest), split=split, shard_max_count=500, workers=0, progress=False)
    return dest


def job(shards: Path, tracking_uri: str, *extra: str):
    sets = [f"data.train={shards}/train.manifest.json", f"data.val={shards}/val.manifest.json",
            "data.build=null", f"mlflow.tracking_uri={tracking_uri}", *extra]
    return load_job(REPO / "jobs" / "quickstart.yaml", sets)


def test_plan_fingerprints_the_first_stage_and_waits_for_upstream_exports(shards, tmp_path):
    planned = plan_job(job(shards, f"sqlite:///{tmp_path}/mlflow.db"))
    assert [p.stage for p in planned] == ["pretrain", "finetune", "evaluate"]
    assert planned[0].status == "run" and len(planned[0].fingerprint) == 64
    assert planned[1].fingerprint is None and planned[2].fingerprint is None  # no pretrain export yet

    changed = plan_job(job(shards, f"sqlite:///{tmp_path}/mlflow.db", "stages.pretrain.mask_ratio=0.7"))
    assert changed[0].fingerprint != planned[0].fingerprint
    scratch = plan_job(job(shards, f"sqlite:///{tmp_path}/mlflow.db", "stages.finetune.init=scratch"))
    assert scratch[1].fingerprint is not None  # finetune from scratch needs no upstream


def test_plan_still_prints_when_mlflow_is_unreachable(shards):
    planned = plan_job(job(shards, "http://127.0.0.1:9"))
    assert planned[0].fingerprint is not None
    assert "MLflow unreachable" in planned[0].status
