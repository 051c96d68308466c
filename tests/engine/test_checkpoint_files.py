"""The `latest` pointer, pruning and RNG capture, on plain folders (the DeepSpeed side is in
test_distributed.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.train import checkpoint as ckpt


def _make_tags(root, *steps):
    for step in steps:
        (root / ckpt.tag_for_step(step)).mkdir()


def test_tag_names_round_trip():
    assert ckpt.tag_for_step(42) == "step00000042"
    assert ckpt.step_of_tag("step00000042") == 42
    assert ckpt.step_of_tag("latest") is None and ckpt.step_of_tag("global_step5") is None


def test_publish_and_read_latest(tmp_path):
    assert ckpt.read_latest(tmp_path) is None
    _make_tags(tmp_path, 5, 10)
    ckpt.publish_latest(tmp_path, "step00000005")
    ckpt.publish_latest(tmp_path, "step00000010")
    assert ckpt.read_latest(tmp_path) == "step00000010"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step00000005",
        "step00000010",
    ]  # no tmp left


def test_latest_naming_a_missing_tag_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step00000099")
    with pytest.raises(PipelineError, match="step00000099"):
        ckpt.read_latest(tmp_path)


def test_prune_keeps_the_newest_and_latest(tmp_path):
    _make_tags(tmp_path, 5, 10, 15, 20)
    (tmp_path / "zero_to_fp32.py").write_text("")
    assert ckpt.prune_tags(tmp_path, keep_last=2, latest="step00000020") == ["step00000005", "step00000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000015", "step00000020", "zero_to_fp32.py"]


def test_prune_drops_unpublished_newer_tags_but_never_latest(tmp_path):
    # a run resumed from step 10 after a crash left an unpublished step 15 behind
    _make_tags(tmp_path, 5, 10, 15)
    deleted = ckpt.prune_tags(tmp_path, keep_last=1, latest="step00000010")
    assert deleted == ["step00000005", "step00000015"]
    assert [p.name for p in tmp_path.iterdir()] == ["step00000010"]


def test_load_without_checkpoint_returns_none(tmp_path):
    assert ckpt.load(object(), tmp_path / "absent") is None
    assert ckpt.load(object(), tmp_path) is None
    with pytest.raises(PipelineError, match="step00000003"):
        ckpt.load(object(), tmp_path, tag="step00000003")


def test_rng_capture_restore():
    state = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert ckpt.gather_rng_states()[0].keys() >= {"python", "numpy", "torch"}  # no process group: one entry
