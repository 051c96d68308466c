"""Jobs chained by reference through `python -m pipeline run` (a local Ray): an evaluate-only job reads
`stages.evaluate.export: job:<name>` from the tracking store and evaluates the *train* split
(`stages.evaluate.split: train` asks the stage table for the train role)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import timm
import torch
from mlflow.tracking import MlflowClient

import models  # noqa: F401
from pipeline import lineage
from pipeline.config import MlflowSettings
from pipeline.data.manifest import load_manifest
from pipeline.data.writer import write_shards
from pipeline.tracking import prepare
from pipeline.train.export import write_export

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "chaining-test"


def test_evaluate_split_train_of_an_export_named_by_job_reference(tmp_path):
    manifests = {split: write_shards("digits", str(tmp_path / "shards"), split=split, shard_max_count=500,
                                     workers=0, progress=False).manifest_url for split in ("train", "val")}
    # an earlier finetune job, as the runner records it: a FINISHED finetune run with its export
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "num_classes": 10, "T": 1}
    export = str(tmp_path / "earlier" / "export")
    write_export(timm.create_model("spikformer_v2_tiny", **kwargs).state_dict(),
                 {"variant": "spikformer_v2_tiny", "kwargs": kwargs, "classes": [str(i) for i in range(10)]}, export)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = prepare(MlflowSettings(tracking_uri=uri, experiment=EXPERIMENT))
    job_run = tracker.start_job_run("digits-ft")
    finetune = tracker.start_stage_run(job_run, "finetune", "f" * 64)
    tracker.set_tags(finetune, {lineage.EXPORT_URL: export})
    tracker.finish_run(finetune, "FINISHED")
    tracker.finish_run(job_run, "FINISHED")

    sets = [f"output_root={tmp_path}/out", f"mlflow.tracking_uri={uri}", f"mlflow.experiment={EXPERIMENT}",
            "data.build=null", f"data.train={manifests['train']}", f"data.val={manifests['val']}",
            "stages.pretrain.enabled=false", "stages.probe.enabled=false", "stages.finetune.enabled=false",
            "stages.evaluate.split=train",
            "stages.evaluate.export=job:digits-ft", "scaling.num_workers=1", "data.loader_workers=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "jobs/quickstart.yaml",
                           *[w for s in sets for w in ("--set", s)]],
                          cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (evaluate,) = client.search_runs([experiment], "tags.`pipeline.stage` = 'evaluate'")
    assert evaluate.info.status == "FINISHED"
    assert evaluate.data.metrics["n_samples"] == load_manifest(manifests["train"]).num_samples == 1437
    tags = evaluate.data.tags
    assert tags[lineage.UPSTREAM_RUN_ID] == finetune
    assert tags[lineage.UPSTREAM_REFERENCE] == "job:digits-ft"
    assert tags[lineage.UPSTREAM_ARTIFACT_URI] == export
    assert tags[lineage.DATASET_URL] == manifests["train"]
