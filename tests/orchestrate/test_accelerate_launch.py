"""The single-node path without Ray: `accelerate launch` (2 CPU processes) runs one stage of a job spec.

Accelerate only starts the processes; the DeepSpeed engine runs inside. The stage must leave the
same outputs and MLflow records as under Ray: a FINISHED run with the dataset input, the export, and
the classifier registered in the model registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.manifest import load_manifest
from pipeline.train.export import read_export

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(900)


def test_accelerate_launch_runs_finetune_with_mlflow_records(tmp_path):
    sets = [f"output_root={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "stages.finetune.init=scratch", "stages.finetune.max_steps=4", "stages.finetune.log_every_steps=2",
            "stages.finetune.batch_size=32", "mlflow.registered_model=digits-accelerate"]
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline.launch_local",
               "jobs/quickstart.yaml", "--stages", "finetune", *[w for s in sets for w in ("--set", s)]]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "finetune  ran" in done.stdout, done.stdout

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("spikformer-quickstart")
    runs = {r.data.tags.get("pipeline.stage", "job"): r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"job", "finetune"}
    finetune = runs["finetune"]
    assert finetune.info.status == "FINISHED" and runs["job"].info.status == "FINISHED"
    (shards,) = (tmp_path / "out" / "shards").glob("digits-*")  # named by the build's fingerprint
    train = load_manifest(f"{shards}/train.manifest.json")
    assert finetune.data.tags["lineage.dataset_digest"] == train.digest
    assert [m.step for m in client.get_metric_history(finetune.info.run_id, "loss")] == [2, 4]
    export_url = finetune.data.tags["pipeline.export_url"]
    state, config = read_export(export_url)
    assert config["variant"] == "spikformer_v2_tiny" and "head.weight" in state
    versions = client.search_model_versions("name='digits-accelerate'")
    assert [v.run_id for v in versions] == [finetune.info.run_id]
    assert any(a.path == "export" for a in client.list_artifacts(finetune.info.run_id))
