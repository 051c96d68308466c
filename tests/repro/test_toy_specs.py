"""Every reproduction spec runs end to end at toy scale through --set overrides only.

The recipe (optimizer, schedule, augmentation, T, mixup, EMA, ZeRO stage...) is the spec's own; only
sizes change: digits shards, the tiny variant at 32 px, 2 CPU processes under torchrun, 2 steps per
stage. This proves the specs validate and that their stages connect (pretrain export -> finetune
init -> evaluate), with the MLflow records the cluster run would leave.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_job
from pipeline.data.manifest import load_manifest

from .conftest import REPO, torchrun, toy_overrides

pytestmark = pytest.mark.timeout(600)
SPECS = ("jobs/reproduce_81.yaml", "jobs/supervised_80.yaml", "jobs/shard_imagenet.yaml")


def stage_runs(tmp_path: Path, experiment: str) -> dict:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags.get("pipeline.stage", "job"): r for r in client.search_runs([exp.experiment_id])}


@pytest.mark.parametrize("spec", SPECS)
def test_spec_validates_with_cluster_values(spec, monkeypatch):
    for name in ("SHARDS", "OUTPUT_ROOT", "IMAGENET_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    job = load_job(REPO / spec)
    assert job.mlflow.tracking_uri.startswith("http") and job.output_root.startswith("s3://")
    if not spec.endswith("shard_imagenet.yaml"):
        assert job.scaling.use_gpu and job.model.img_size == 224 and job.model.num_classes == 1000
    else:
        assert job.data.build.source == "imagenet" and job.data.build.splits == ["train", "val"]
        assert job.data.build.dest.startswith("s3://")
        assert not any(getattr(job.stages, s).enabled for s in ("pretrain", "finetune", "evaluate"))


def _section(text: str, name: str) -> str:
    """The indented lines under a top-level `name:` key ('' when the spec has no such section)."""
    if f"\n{name}:\n" not in text:
        return ""
    return re.split(r"\n(?=[a-z_]+:)", text.split(f"\n{name}:\n", 1)[1], maxsplit=1)[0]


@pytest.mark.parametrize("spec", ["jobs/reproduce_81.yaml", "jobs/supervised_80.yaml", "jobs/pretrain.yaml",
                                  "jobs/finetune.yaml"])
def test_every_recipe_value_names_its_source(spec):
    """Each `key: value` line of the recipe sections carries a comment (source or '(ours)')."""
    text = (REPO / spec).read_text()
    recipe = _section(text, "stages") + _section(text, "deepspeed")
    assert recipe
    uncommented = [line for line in recipe.splitlines()
                   if re.match(r"^\s+[a-z_]+: \S", line) and "#" not in line and "enabled:" not in line]
    assert uncommented == []


def test_reproduce_81_chain_at_toy_scale(tmp_path, digits_manifests):
    done = torchrun("jobs/reproduce_81.yaml", toy_overrides(tmp_path, digits_manifests))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for stage in ("pretrain", "finetune", "evaluate"):
        assert re.search(rf"{stage}\s+ran", done.stdout), done.stdout
    runs = stage_runs(tmp_path, "spikformer-v2-imagenet")
    assert set(runs) == {"job", "pretrain", "finetune", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # the stages connect: finetune starts from the pretrain export, evaluate reads the finetune export
    pretrain_export = runs["pretrain"].data.tags["pipeline.export_url"]
    assert runs["finetune"].data.params["stages.finetune.init"] == "pretrain"
    assert runs["finetune"].data.tags["lineage.upstream_run_id"] == runs["pretrain"].info.run_id
    assert runs["evaluate"].data.tags["lineage.upstream_run_id"] == runs["finetune"].info.run_id
    assert pretrain_export and runs["finetune"].data.params["stages.finetune.T"] == "1"
    # the recipe travelled unchanged: EMA, layer decay, mixup from the spec
    params = runs["finetune"].data.params
    assert params["stages.finetune.ema.decay"] == "0.99996"
    assert params["stages.finetune.optimizer.layer_decay"] == "0.75"
    val = load_manifest(digits_manifests["val"])
    assert runs["evaluate"].data.metrics["n_samples"] == val.num_samples


def test_supervised_80_scratch_T4_at_toy_scale(tmp_path, digits_manifests):
    done = torchrun("jobs/supervised_80.yaml", toy_overrides(tmp_path, digits_manifests))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    runs = stage_runs(tmp_path, "spikformer-v2-imagenet")
    assert set(runs) == {"job", "finetune", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    finetune, evaluate = runs["finetune"], runs["evaluate"]
    assert finetune.data.params["stages.finetune.init"] == "scratch"
    assert finetune.data.params["stages.finetune.T"] == "4"
    assert evaluate.data.metrics["T"] == 4.0
    assert evaluate.data.tags["lineage.upstream_run_id"] == finetune.info.run_id


def test_shard_imagenet_builds_both_splits_without_training(tmp_path):
    from tests.data.images import build_imagenet

    root = build_imagenet(tmp_path / "ILSVRC2012", val_layout="folders")
    sets = [f"output_root={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"data.build.root={root}", f"data.build.dest={tmp_path}/shards", "data.build.shard_max_count=5"]
    done = torchrun("jobs/shard_imagenet.yaml", sets, nproc=1)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    train = load_manifest(f"{tmp_path}/shards/train.manifest.json")
    val = load_manifest(f"{tmp_path}/shards/val.manifest.json")
    images = {split: len(list((root / split).rglob("*.JPEG"))) for split in ("train", "val")}
    assert (train.num_samples, val.num_samples) == (images["train"], images["val"])
    assert len(train.shards) == -(-images["train"] // 5) and train.classes == val.classes
    runs = stage_runs(tmp_path, "spikformer-v2-imagenet")
    assert set(runs) == {"job"} and runs["job"].info.status == "FINISHED"


def test_shard_imagenet_through_pipeline_run_on_a_local_ray(tmp_path):
    """The documented path: `python -m pipeline run jobs/shard_imagenet.yaml` (Ray tasks), with the
    validation set as unpacked from the tarballs: flat JPEGs + the devkit's ground truth."""
    from tests.data.images import build_imagenet

    root = build_imagenet(tmp_path / "ILSVRC2012", val_layout="devkit")
    sets = [f"output_root={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"data.build.root={root}", f"data.build.dest={tmp_path}/shards", "data.build.shard_max_count=5"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SHARDS", "IMAGENET_ROOT")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "jobs/shard_imagenet.yaml",
                           *[w for s in sets for w in ("--set", s)]],
                          cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    val = load_manifest(f"{tmp_path}/shards/val.manifest.json")
    assert val.num_samples == len(list((root / "val").glob("*.JPEG"))) and not val.skipped
    assert val.classes == load_manifest(f"{tmp_path}/shards/train.manifest.json").classes
    assert set(stage_runs(tmp_path, "spikformer-v2-imagenet")) == {"job"}
