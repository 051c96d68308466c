"""A two-cell sweep through `python -m pipeline run` (a local Ray): one parent run with a child job run
per cell, the comparison table and plot as its artifacts; a re-run reuses the finished cells."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from mlflow.tracking import MlflowClient

import models  # noqa: F401
from pipeline.config import load_job
from pipeline.data.writer import write_shards
from pipeline.errors import PipelineError
from pipeline.runner.sweep import comparison, expand, markdown
from pipeline.train.export import write_export

REPO = Path(__file__).resolve().parents[2]


def sweep_spec(tmp: Path) -> Path:
    urls = {split: write_shards("digits", str(tmp / "shards"), split=split, shard_max_count=500, workers=0,
                                progress=False).manifest_url for split in ("train", "val")}
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "num_classes": 10, "T": 1}
    export = str(tmp / "classifier")
    write_export(timm.create_model("spikformer_v2_tiny", **kwargs).state_dict(),
                 {"variant": "spikformer_v2_tiny", "kwargs": kwargs}, export)
    spec = {
        "name": "sweep-test", "output_root": str(tmp / "out"),
        "data": {"train": urls["train"], "val": urls["val"], "loader_workers": 0},
        "stages": {"pretrain": {"enabled": False}, "finetune": {"enabled": False},
                   "evaluate": {"export": export, "batch_size": 128, "energy_batches": 1}},
        "scaling": {"num_workers": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "sweep-test"},
        "sweep": {"cells": [{"name": "T1", "set": {"stages.evaluate.T": 1}},
                            {"name": "T2", "set": {"stages.evaluate.T": 2}}], "seeds": 1},
    }
    path = tmp / "sweep.yaml"
    path.write_text(json.dumps(spec))
    return path


def run(spec: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec)], cwd=REPO,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_cell_sweep_then_rerun(tmp_path):
    spec = sweep_spec(tmp_path)
    done = run(spec)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("sweep-test").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`pipeline.sweep` = 'sweep-test'")
    assert parent.info.status == "FINISHED"
    cells = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["pipeline.sweep"] for r in cells) == ["T1", "T2"]
    assert all(r.info.status == "FINISHED" for r in cells)
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert files == {"comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"}
    local = client.download_artifacts(parent.info.run_id, "comparison/comparison.csv", str(tmp_path / "dl"))
    rows = {r["cell"]: r for r in csv.DictReader(open(local))}
    assert set(rows) == {"T1", "T2"} and all(r["seeds"] == "1" for r in rows.values())
    evaluates = {r.data.tags["pipeline.sweep"]: r for r in cells}
    for cell, row in rows.items():  # the table holds what the cell's evaluate run measured
        job_run = evaluates[cell].info.run_id
        (evaluate,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{job_run}'")
        assert float(row["top1_mean"]) == pytest.approx(evaluate.data.metrics["top1"])
        assert evaluate.data.metrics["T"] == float(cell[1])

    again = run(spec)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 cell runs (2 reused)" in again.stdout
    parents = client.search_runs([experiment], "tags.`pipeline.sweep` = 'sweep-test'")
    assert len(parents) == 2  # a second sweep run, whose cells point at the finished ones
    assert len(client.search_runs([experiment], "tags.`pipeline.stage` = 'evaluate'")) == 2  # nothing re-ran


def test_cells_expand_with_a_grid_and_bad_overrides_name_the_cell(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = load_job(REPO / "jobs" / "quickstart.yaml", [
        'sweep={"grid": {"init": {"ssl": {}, "scratch": {"stages.finetune.init": "scratch"}}, '
        '"labels": {"10": {"stages.finetune.label_fraction": 0.1}, "100": {}}}, "seeds": [3, 4]}'])
    runs = expand(job)
    assert [(r.cell, r.seed) for r in runs][:3] == [("ssl-10", 3), ("ssl-10", 4), ("ssl-100", 3)]
    assert len(runs) == 8 and runs[0].job.stages.finetune.label_fraction == 0.1 and runs[0].job.seed == 3
    assert {r.job.name for r in runs if r.cell == "scratch-100"} == {"quickstart.scratch-100.s3",
                                                                     "quickstart.scratch-100.s4"}
    bad = load_job(REPO / "jobs" / "quickstart.yaml",
                   ['sweep={"cells": [{"name": "x", "set": {"stages.finetune.labelfraction": 0.1}}]}'])
    with pytest.raises(PipelineError, match="sweep cell x: stages.finetune.labelfraction: unknown key"):
        expand(bad)
    rows = comparison(runs[:2])
    assert rows[0]["cell"] == "ssl-10" and rows[0]["seeds"] == 2 and rows[0]["top1_mean"] is None
    assert markdown(rows).splitlines()[2].startswith("| ssl-10 | 2 | - |")
