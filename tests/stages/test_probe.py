"""The linear-probe stage and the kNN monitor through the real runner: pretrain (a few MIM steps, kNN on,
ZeRO-3 so every encoder forward is a collective) then probe, in one torchrun launch of two CPU ranks
with a sqlite MLflow store. The monitor's distributed result (bank gathered over ranks, exact counts)
is recomputed here in one process from the pretrain export (measured: 0.28 logged and recomputed; the
same recomputation with only rank 0's half of the bank gives 0.15, with rank 0's BatchNorm estimate
alone 0.26, with the running statistics 0.08, so a missing gather or BN average fails it); the probe's
folded export is checked to be the probe itself."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from stage_helpers import VAL_SAMPLES, Records, launch, make_job

import models  # noqa: F401
from pipeline.data.stream import build_loader
from pipeline.stages.evaluate import load_classifier
from pipeline.stages.knn import knn_accuracy, rank_quota
from pipeline.stages.probe import LinearProbe, fold_probe_state
from pipeline.train.export import read_export

PRETRAIN_STEPS, KNN_EVERY, PROBE_STEPS = 8, 4, 10
BANK, EVAL, KNN_BATCH, WORLD = 200, 100, 50, 2


@pytest.fixture(scope="module")
def chain(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    job = make_job(digits_shards, **{
        "deepspeed.zero_stage": 3,
        "stages.pretrain.max_steps": PRETRAIN_STEPS, "stages.pretrain.checkpoint.every_steps": 100,
        "stages.pretrain.knn_every_steps": KNN_EVERY, "stages.pretrain.knn_bank_size": BANK,
        "stages.pretrain.knn_eval_size": EVAL, "stages.pretrain.knn_batch_size": KNN_BATCH,
        "stages.probe": {
            "enabled": True, "max_steps": PROBE_STEPS, "batch_size": 32, "eval_batch_size": 128,
            "optimizer": {"base_lr": 4e-2, "warmup_epochs": 0.1},
            "augment": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0},
            "log_every_steps": 5, "checkpoint": {"every_steps": 100},
        },
    })
    launch(out, job, "pretrain,probe")
    return Records(out)


def test_probe_run_has_lineage_and_exact_val_counts(chain):
    pretrain, probe = chain.run("pretrain"), chain.run("probe")
    assert probe.info.status == "FINISHED"
    assert probe.data.tags["lineage.upstream_run_id"] == pretrain.info.run_id
    assert probe.data.tags["lineage.upstream_artifact_uri"] == pretrain.data.tags["pipeline.export_url"]
    assert probe.data.tags["mlflow.parentRunId"] == pretrain.data.tags["mlflow.parentRunId"]
    metrics = probe.data.metrics
    assert metrics["n_samples"] == VAL_SAMPLES
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    for value in (metrics["top1"], metrics["top5"]):  # exact counts over the 360 images
        assert value * VAL_SAMPLES == pytest.approx(round(value * VAL_SAMPLES), abs=1e-6)
    assert metrics["steps"] == PROBE_STEPS
    assert [step for step, _ in chain.history("probe", "loss")] == [5, 10]


def test_probe_export_is_the_probe_folded_into_one_classifier(chain):
    model, config = load_classifier(chain.result("probe")["export_url"])  # what evaluate loads, strictly
    assert config["kind"] == "classifier" and config["stage"] == "probe"
    assert config["init"] == chain.result("pretrain")["export_url"]
    encoder_state, _ = read_export(config["init"])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder_state.items()), "the encoder must stay frozen"


def test_folding_the_batchnorm_into_the_head_is_exact():
    torch.manual_seed(0)
    encoder = timm.create_model("spikformer_v2_tiny", num_classes=0)
    probe = LinearProbe(encoder, encoder.embed_dim, 10)
    probe.norm.running_mean.normal_()
    probe.norm.running_var.uniform_(0.1, 3.0)
    probe.head.weight.data.normal_()
    classifier = timm.create_model("spikformer_v2_tiny", num_classes=10)
    classifier.load_state_dict(fold_probe_state(probe.state_dict()), strict=True)
    features = torch.randn(16, encoder.embed_dim)
    probe.eval()
    with torch.no_grad():
        assert torch.allclose(classifier.head(features), probe.head(probe.norm(features)), atol=1e-4)


def test_knn_history_has_the_random_encoder_and_the_final_value(chain):
    history = chain.history("pretrain", "knn_top1")
    assert [step for step, _ in history] == [0, 4, 8]
    assert all(0 <= value <= 1 for _, value in history)
    metrics = chain.run("pretrain").data.metrics
    assert metrics["knn_bank_samples"] == BANK and metrics["knn_eval_samples"] == EVAL
    assert metrics["knn_seconds_total"] > 0 and 0 < metrics["knn_time_share"] < 1
    runs = chain.runs("pretrain", "FINISHED")
    inputs = {d.dataset.digest for d in chain.client.get_run(runs[0].info.run_id).inputs.dataset_inputs}
    assert len(inputs) == 2  # pretrain = train manifest, plus val (its kNN queries)


def _rank_batches(url: str, rank: int, size: int):
    """The first batches of `rank`'s eval stream, as many as the monitor embeds."""
    loader = build_loader(url, "eval", batch_size=KNN_BATCH, img_size=32, rank=rank, world_size=WORLD,
                          num_workers=0, augment={"crop_pct": 1.0, "interpolation": "bicubic"})
    count = min(len(loader), math.ceil(size / (WORLD * KNN_BATCH)))
    batches = []
    for images, labels in loader:
        batches.append((images, labels))
        if len(batches) == count:
            return batches
    return batches


def _bn_estimate(encoder: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
    """One rank's estimate: the cumulative average of its real bank images' batch statistics."""
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    encoder.train()
    with torch.no_grad():
        for images, labels in batches:
            encoder(images[labels >= 0])
    return {k: v.clone() for k, v in encoder.state_dict().items() if "running_" in k}


def _subset(encoder: torch.nn.Module, url: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    per_rank = []
    for rank in range(WORLD):
        with torch.no_grad():
            rows = [(encoder(images)[labels >= 0], labels[labels >= 0]) for images, labels in
                    _rank_batches(url, rank, size)]
        per_rank.append((torch.cat([f for f, _ in rows]), torch.cat([y for _, y in rows])))
    counts = [len(y) for _, y in per_rank]
    kept = [rank_quota(counts, r, size) for r in range(WORLD)]
    return (torch.cat([f[:n] for (f, _), n in zip(per_rank, kept, strict=True)]),
            torch.cat([y[:n] for (_, y), n in zip(per_rank, kept, strict=True)]))


def test_final_knn_equals_a_one_process_recomputation_from_the_export(chain, digits_shards):
    state, config = read_export(chain.result("pretrain")["export_url"])
    encoder = timm.create_model(config["variant"], **config["kwargs"])
    encoder.load_state_dict(state, strict=True)
    estimates = [_bn_estimate(encoder, _rank_batches(digits_shards["train"], rank, BANK)) for rank in range(WORLD)]
    encoder.load_state_dict({k: sum(e[k] for e in estimates) / WORLD for k in estimates[0]}, strict=False)
    encoder.eval()
    bank, bank_labels = _subset(encoder, digits_shards["train"], BANK)
    queries, labels = _subset(encoder, digits_shards["val"], EVAL)
    assert len(bank) == BANK and len(queries) == EVAL
    expected = knn_accuracy(queries, labels, bank, bank_labels, 10)
    logged = dict(chain.history("pretrain", "knn_top1"))[PRETRAIN_STEPS]
    assert logged == pytest.approx(expected.top1, abs=1.01 / EVAL)  # at most one near-tie may flip
    assert dict(chain.history("pretrain", "knn_top5"))[PRETRAIN_STEPS] == pytest.approx(expected.top5, abs=1.01 / EVAL)
