"""The weighted kNN classifier and the monitor (pipeline.stages.knn), in one process: votes weighted by
exp(similarity / T), separable features against shuffled labels, and a real Spikformer encoder trained
for a few supervised steps against its random initialisation. The distributed path (two ranks, ZeRO-3,
gathered bank) is checked against a one-process recomputation in test_probe.py."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import models  # noqa: F401
from pipeline.data.stream import build_loader
from pipeline.stages.knn import KnnMonitor, embed, knn_accuracy, knn_votes, rank_quota

IMG = 16  # digits at 16 px: 4x fewer MACs than the 32 px recipe, enough for the tiny encoder to learn
BANK, EVAL, BATCH = 400, 200, 100


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    # one very close neighbour of class 1 against two moderately close ones of class 0
    query = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.99, math.sqrt(1 - 0.99**2)], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([1, 0, 0])
    sharp = knn_votes(query, bank, labels, 2, k=3, temperature=0.07)
    assert sharp.argmax(dim=1).item() == 1  # exp(0.99/0.07) > 2 exp(0.8/0.07)
    assert torch.allclose(sharp[0], torch.tensor([2 * math.exp(0.8 / 0.07), math.exp(0.99 / 0.07)]), rtol=1e-4)
    flat = knn_votes(query, bank, labels, 2, k=3, temperature=100.0)
    assert flat.argmax(dim=1).item() == 0  # near-uniform weights: the majority wins (control)
    assert knn_votes(query, bank, labels, 2, k=2, temperature=100.0)[0].tolist() == pytest.approx(
        [math.exp(0.8 / 100), math.exp(0.99 / 100)], rel=1e-5)  # only the k most similar vote
    # cosine, not dot product: scaling a bank vector changes nothing
    assert torch.allclose(knn_votes(query, bank * torch.tensor([[5.0], [1.0], [0.1]]), labels, 2), sharp, rtol=1e-4)


def test_separable_features_beat_chance_and_shuffled_labels_do_not():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=generator) * 3
    bank_labels = torch.arange(10).repeat(50)
    labels = torch.arange(10).repeat(20)
    bank = centres[bank_labels] + torch.randn(500, 32, generator=generator)
    queries = centres[labels] + torch.randn(200, 32, generator=generator)
    assert knn_accuracy(queries, labels, bank, bank_labels, 10).top1 > 0.9
    shuffled = bank_labels[torch.randperm(500, generator=generator)]
    result = knn_accuracy(queries, labels, bank, shuffled, 10)
    assert result.top1 < 0.25 and result.top5 < 0.7  # chance: 0.1 / 0.5


def test_rank_quota_keeps_the_first_rows_in_rank_order():
    counts = [100, 60, 0, 90]
    assert [rank_quota(counts, r, 150) for r in range(4)] == [100, 50, 0, 0]
    assert [rank_quota(counts, r, 1000) for r in range(4)] == counts


def _loader(url: str, batch: int = BATCH):
    return build_loader(url, "eval", batch_size=batch, img_size=IMG, num_workers=0, augment={"crop_pct": 1.0})


class _Features(torch.nn.Module):
    """A classifier's pooled features (what the monitor sees of an encoder)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


def _monitor(encoder: torch.nn.Module, shards: dict[str, str]) -> KnnMonitor:
    return KnnMonitor(encoder, _loader(shards["train"]), _loader(shards["val"]), bank_size=BANK, eval_size=EVAL,
                      batch_size=BATCH, num_classes=10, device=torch.device("cpu"), dtype=torch.float32)


def _train(model: torch.nn.Module, url: str, steps: int) -> None:
    loader = build_loader(url, "train", batch_size=32, img_size=IMG, num_workers=0,
                          augment={"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "hflip": 0.0, "auto_augment": None,
                                   "re_prob": 0.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3)
    model.train()
    for step, (images, labels) in enumerate(loader, start=1):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == steps:
            return


def test_a_trained_encoder_scores_above_its_random_initialisation(digits_shards):
    torch.manual_seed(0)
    model = timm.create_model("spikformer_v2_tiny", img_size=IMG, num_classes=10)
    monitor = _monitor(_Features(model), digits_shards)

    # the running statistics of a fresh model (mean 0, var 1) silence it in eval mode: all-zero features
    model.eval()
    silent, _ = embed(monitor.encoder, _loader(digits_shards["val"]), 1, torch.device("cpu"), torch.float32)
    assert silent.abs().sum() == 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    random_init = monitor.evaluate(0, estimate_bn=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the estimate must restore the running statistics"
    assert model.training  # the monitor put the mode back

    _train(model, digits_shards["train"], steps=20)
    trained = monitor.evaluate(20, estimate_bn=True)
    for result in (random_init, trained):
        assert result["knn_bank_samples"] == BANK and result["knn_eval_samples"] == EVAL
    # measured: random 0.24, trained 0.445 (200 queries: one standard error is ~0.035)
    assert trained["knn_top1"] > 0.3, trained
    assert trained["knn_top1"] > random_init["knn_top1"] + 0.1, (random_init, trained)
    assert trained["knn_top5"] >= trained["knn_top1"]
