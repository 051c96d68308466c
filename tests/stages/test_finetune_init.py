"""Finetune initial weights: strict encoder loading and its error messages (no training)."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import models  # noqa: F401
from pipeline.config import FinetuneSettings
from pipeline.errors import PipelineError
from pipeline.stages.finetune import init_source, load_initial_weights
from pipeline.train.export import write_export


def _classifier(**kwargs):
    return timm.create_model("spikformer_v2_tiny", **kwargs)


def _export_encoder(url: str, **kwargs) -> dict[str, torch.Tensor]:
    encoder = _classifier(num_classes=0, **kwargs)
    write_export(encoder.state_dict(), {"variant": "spikformer_v2_tiny", "kwargs": {"num_classes": 0, **kwargs}},
                 url)
    return encoder.state_dict()


def test_same_variant_loads_every_non_head_tensor(tmp_path):
    state = _export_encoder(str(tmp_path / "enc"))
    model = _classifier(num_classes=10)
    head_before = model.head.weight.clone()
    load_initial_weights(model, str(tmp_path / "enc"), "spikformer_v2_tiny")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert torch.equal(model.head.weight, head_before)  # the head stays as initialised


def test_plain_safetensors_file_works_too(tmp_path):
    encoder = _classifier(num_classes=10)
    save_file(encoder.state_dict(), str(tmp_path / "weights.safetensors"))  # a head inside is ignored
    model = _classifier(num_classes=10)
    load_initial_weights(model, str(tmp_path / "weights.safetensors"), "spikformer_v2_tiny")
    assert torch.equal(model.block[0].attn.q_conv.weight, encoder.block[0].attn.q_conv.weight)


def test_other_width_names_shape_mismatches(tmp_path):
    _export_encoder(str(tmp_path / "wide"), embed_dim=96, num_heads=4)
    with pytest.raises(PipelineError) as err:
        load_initial_weights(_classifier(num_classes=10), str(tmp_path / "wide"), "spikformer_v2_tiny")
    message = str(err.value)
    assert "does not fit model.variant spikformer_v2_tiny" in message and "shape mismatches" in message
    assert re.search(r"block\.0\.[\w.]+ \(export \(96,( 96, 1, 1)?\), model \(64,( 64, 1, 1)?\)\)", message)
    assert str(tmp_path / "wide") in message


def test_other_depth_names_missing_and_unexpected_keys(tmp_path):
    _export_encoder(str(tmp_path / "deep"), depth=3)
    with pytest.raises(PipelineError, match=r"unexpected keys \[block\.2\."):
        load_initial_weights(_classifier(num_classes=10), str(tmp_path / "deep"), "spikformer_v2_tiny")
    _export_encoder(str(tmp_path / "shallow"), depth=1)
    with pytest.raises(PipelineError, match=r"missing keys \[block\.1\."):
        load_initial_weights(_classifier(num_classes=10), str(tmp_path / "shallow"), "spikformer_v2_tiny")


def test_init_source_choices():
    assert init_source(FinetuneSettings(init="scratch"), "memory://x") is None
    assert init_source(FinetuneSettings(init="pretrain"), "memory://up") == "memory://up"
    # a URL or reference in init reaches the stage already resolved by the runner, as upstream_export
    assert init_source(FinetuneSettings(init="job:ssl"), "s3://b/enc") == "s3://b/enc"
    for init in ("pretrain", "s3://b/enc"):
        with pytest.raises(PipelineError, match="no pretrain export"):
            init_source(FinetuneSettings(init=init), None)
