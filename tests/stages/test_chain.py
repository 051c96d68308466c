"""The fast end-to-end check: pretrain -> finetune -> evaluate on digits in one torchrun launch
(2 CPU ranks, gloo, ZeRO-2), a few dozen steps each. The slow per-ZeRO-stage resume tests are in
test_zero_resume.py."""

from __future__ import annotations

import json

import pytest
import timm
from PIL import Image
from stage_helpers import VAL_SAMPLES, launch, make_job, read_jsonl, result

import models  # noqa: F401
from pipeline.export import read_export

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
    return out


def test_evaluate_counts_the_manifest_and_learned(chain):
    metrics = result(chain, "evaluate")["metrics"]
    assert metrics["n_samples"] == VAL_SAMPLES
    assert metrics["top1"] >= MIN_TOP1, metrics
    assert metrics["top5"] >= metrics["top1"]
    assert metrics["energy_pj_per_image"] > 0 and metrics["sops_per_image"] > 0
    report = json.loads((chain / "evaluate" / "eval_report.json").read_text())
    assert sum(c["count"] for c in report["per_class"].values()) == VAL_SAMPLES
    assert sum(map(sum, report["confusion_matrix"])) == VAL_SAMPLES
    assert report["energy"]["T"] == 1 and report["energy"]["firing_rates"]
    assert Image.open(chain / "evaluate" / "confusion_matrix.png").size[0] > 100
    assert (chain / "evaluate" / "artifacts" / "eval_report.json").exists()  # logged as an artifact


def test_pretrain_outputs(chain):
    res = result(chain, "pretrain")
    state, config = read_export(res["export_url"])
    assert config["kind"] == "encoder" and config["kwargs"]["num_classes"] == 0
    assert not any(k.startswith("head.") for k in state)
    encoder = timm.create_model(config["variant"], **config["kwargs"])
    encoder.load_state_dict(state, strict=True)
    metrics = read_jsonl(chain / "pretrain" / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < 0.9 * losses[0], losses
    logged = [m for m in metrics if "lr" in m]
    for key in ("lr", "grad_norm", "images_per_s", "step_time", "peak_mem_mb", "skipped_samples"):
        assert all(key in m for m in logged), key
    assert any(k.startswith("firing_rate/") for m in metrics for k in m)  # at the slower interval
    images = sorted(p.name for p in (chain / "pretrain" / "images").iterdir())
    assert "reconstruction_step0000008.png" in images and "reconstruction_final.png" in images
    grid = Image.open(chain / "pretrain" / "images" / "reconstruction_final.png")
    assert grid.size == (4 * (8 * 34 + 2), 4 * (3 * 34 + 2))  # 8 columns x 3 rows of 32 px, scaled 4x
    lines = (chain / "pretrain" / "loss_curve.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == PRETRAIN_STEPS + 1


def test_finetune_starts_from_the_pretrained_encoder(chain):
    config = read_export(result(chain, "finetune")["export_url"])[1]
    assert config["init"] == result(chain, "pretrain")["export_url"]
    assert config["classes"] == [str(i) for i in range(10)]
    # every rank reported the step-50 checkpoint and the final one
    reports = read_jsonl(chain / "finetune" / "reports.jsonl")
    assert sorted((r["rank"], int(r["metrics"]["step"])) for r in reports) == [
        (0, 50), (0, FINETUNE_STEPS), (1, 50), (1, FINETUNE_STEPS)]
    assert read_jsonl(chain / "finetune" / "metrics.jsonl")[-1]["steps"] == FINETUNE_STEPS
