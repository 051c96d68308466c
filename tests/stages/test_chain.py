"""The fast end-to-end check: pretrain -> finetune -> evaluate on digits in one torchrun launch of the
real runner (2 CPU ranks, gloo, ZeRO-2, sqlite MLflow), a few dozen steps each. The slow per-ZeRO-stage
resume tests are in test_zero_resume.py."""

from __future__ import annotations

import json

import pytest
import timm
from PIL import Image
from stage_helpers import VAL_SAMPLES, Records, launch, make_job

import models  # noqa: F401
from pipeline.train.export import read_export

PRETRAIN_STEPS, FINETUNE_STEPS = 12, 100
# Chance is 10%; 360 validation images put chance-level runs below ~16% with overwhelming odds. The
# recipe below (no augmentation, for speed) reaches ~45-50%; the bar sits far above chance and well
# below what it reaches.
MIN_TOP1 = 0.30


@pytest.fixture(scope="module")
def chain(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain")
    job = make_job(digits_shards, **{
        "stages.pretrain.max_steps": PRETRAIN_STEPS, "stages.pretrain.checkpoint.every_steps": 100,
        "stages.finetune.max_steps": FINETUNE_STEPS, "stages.finetune.checkpoint.every_steps": 50,
        "stages.finetune.log_every_steps": 10,
    })
    launch(out, job, "pretrain,finetune,evaluate")
    return Records(out)


def test_evaluate_counts_the_manifest_and_learned(chain):
    metrics = chain.result("evaluate")["metrics"]
    assert metrics["n_samples"] == VAL_SAMPLES
    assert metrics["top1"] >= MIN_TOP1, metrics
    assert metrics["top5"] >= metrics["top1"]
    assert metrics["energy_pj_per_image"] > 0 and metrics["sops_per_image"] > 0
    folder = chain.folder("evaluate")
    report = json.loads((folder / "eval_report.json").read_text())
    assert sum(c["count"] for c in report["per_class"].values()) == VAL_SAMPLES
    assert sum(map(sum, report["confusion_matrix"])) == VAL_SAMPLES
    assert report["energy"]["T"] == 1 and report["energy"]["firing_rates"]
    assert Image.open(folder / "confusion_matrix.png").size[0] > 100
    assert "eval_report.json" in chain.artifacts("evaluate")  # logged as an artifact
    assert "images/confusion_matrix.png" in chain.artifacts("evaluate", "images")


def test_pretrain_outputs(chain):
    res = chain.result("pretrain")
    state, config = read_export(res["export_url"])
    assert config["kind"] == "encoder" and config["kwargs"]["num_classes"] == 0
    assert not any(k.startswith("head.") for k in state)
    encoder = timm.create_model(config["variant"], **config["kwargs"])
    encoder.load_state_dict(state, strict=True)
    losses = [v for _, v in chain.history("pretrain", "loss")]
    assert losses[-1] < 0.9 * losses[0], losses
    logged = [step for step, _ in chain.history("pretrain", "lr")]
    assert logged == [4, 8, 12]
    for key in ("grad_norm", "images_per_s", "step_time", "peak_mem_mb", "skipped_samples"):
        assert [step for step, _ in chain.history("pretrain", key)] == logged, key
    assert any(k.startswith("firing_rate_train/") for k in chain.run("pretrain").data.metrics)  # at the slower interval
    images = chain.artifacts("pretrain", "images")
    assert "images/reconstruction_step0000008.png" in images and "images/reconstruction_final.png" in images
    folder = chain.folder("pretrain")
    grid = Image.open(folder / "reconstruction_final.png")
    assert grid.size == (4 * (8 * 34 + 2), 4 * (3 * 34 + 2))  # 8 columns x 3 rows of 32 px, scaled 4x
    lines = (folder / "loss_curve.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == PRETRAIN_STEPS + 1
    assert "loss_curve.csv" in chain.artifacts("pretrain")


def test_finetune_starts_from_the_pretrained_encoder(chain):
    config = read_export(chain.result("finetune")["export_url"])[1]
    assert config["init"] == chain.result("pretrain")["export_url"]
    assert config["classes"] == [str(i) for i in range(10)]
    run = chain.run("finetune")
    assert run.data.tags["lineage.upstream_run_id"] == chain.run("pretrain").info.run_id
    assert run.data.metrics["steps"] == FINETUNE_STEPS
    # checkpoints at step 50 and the final one, both kept (keep_last 2), for both ranks
    checkpoints = chain.folder("finetune") / "work" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step{FINETUNE_STEPS:08d}"
    tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert tags == ["step00000050", f"step{FINETUNE_STEPS:08d}"]
    for tag in tags:
        shards = sorted(p.name for p in (checkpoints / tag).glob("*optim_states.pt"))
        assert len(shards) == 2, shards  # ZeRO-2: one optimizer shard per rank
