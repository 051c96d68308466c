"""Evaluate's counting rules on a hand-made stream: padding dropped, counts checked (no processes)."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.stages.evaluate import check_count, evaluate_stream


class _Fixed(torch.nn.Module):
    """Predicts class (first pixel value) so the expected confusion matrix is known."""

    num_classes = 3

    def forward(self, images):
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), 3).float() * 5


def test_padding_is_dropped_and_confusion_counts_real_samples():
    def batch(predicted, labels):
        images = torch.zeros(len(labels), 3, 4, 4)
        images[:, 0, 0, 0] = torch.tensor(predicted, dtype=torch.float)
        return images, torch.tensor(labels)

    loader = [batch([0, 1, 2, 2], [0, 1, 1, 2]), batch([1, 0, 0, 0], [1, -1, -1, -1]), batch([0, 0], [-1, -1])]
    confusion, top5, kept = evaluate_stream(_Fixed(), loader, torch.device("cpu"), 3, energy_batches=5)
    assert confusion.tolist() == [[1, 0, 0], [0, 2, 1], [0, 0, 1]]
    assert int(top5) == 5  # 3 classes: top-k is top-3, always right
    assert [len(b) for b in kept] == [4, 1]  # padding never reaches the energy report


def test_label_outside_the_head_is_an_error():
    loader = [(torch.zeros(1, 3, 4, 4), torch.tensor([7]))]
    with pytest.raises(PipelineError, match="label 7"):
        evaluate_stream(_Fixed(), loader, torch.device("cpu"), 3, energy_batches=1)


def test_count_must_equal_the_manifest():
    check_count(360, 360, "memory://val.manifest.json")
    with pytest.raises(PipelineError, match="evaluated 359 samples .* manifest lists 360"):
        check_count(359, 360, "memory://val.manifest.json")
