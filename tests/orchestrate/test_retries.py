"""Retries are for faults a retry can fix: a corrupt shard fails its stage in exactly one attempt, even
with scaling.max_failures=3, through `python -m pipeline run` on a local Ray (a lost worker is retried:
tests/orchestrate/test_ray_job.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.manifest import load_manifest
from pipeline.data.writer import write_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_corrupt_shard_fails_the_stage_at_once(tmp_path):
    urls = {split: write_shards("digits", str(tmp_path / "shards"), split=split, shard_max_count=500, workers=0,
                                progress=False).manifest_url for split in ("train", "val")}
    shard = Path(urls["train"]).parent / load_manifest(urls["train"]).shards[0].url  # relative to the manifest
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # rot inside a PNG of the first train shard
    shard.write_bytes(bytes(data))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [f"output_root={tmp_path}/out", f"mlflow.tracking_uri={uri}", "mlflow.experiment=retries",
            "data.build=null", f"data.train={urls['train']}", f"data.val={urls['val']}", "data.loader_workers=0",
            "stages.pretrain.enabled=false", "stages.probe.enabled=false", "stages.finetune.init=scratch",
            "stages.finetune.max_steps=30",
            "scaling.num_workers=1", "scaling.max_failures=3"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "jobs/quickstart.yaml",
                           *[w for s in sets for w in ("--set", s)]],
                          cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: stage finetune: ") and shard.name in errors[0], errors
    assert "retrying" not in done.stdout + done.stderr

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("retries").experiment_id
    (finetune,) = client.search_runs([experiment], "tags.`pipeline.stage` = 'finetune'")
    assert finetune.info.status == "FAILED"
    assert finetune.data.tags["pipeline.attempts"] == "1"
    assert shard.name in finetune.data.tags["pipeline.error"]
