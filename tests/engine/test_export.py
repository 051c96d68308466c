"""The export format: round trip (local dir and fsspec memory://), digest, and the errors."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest
import torch
from toy import ToyNet

from pipeline.errors import PipelineError
from pipeline.train.export import export_digest, read_export, write_export


def _model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = ToyNet()
    model(torch.randn(4, 1, 8, 8))  # move the BN running stats away from their defaults
    return model.state_dict()


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_round_trip_is_bit_exact(tmp_path, kind):
    url = str(tmp_path / "export") if kind == "local" else "memory://engine-tests/export"
    state = _model_state()
    digest = write_export(state, {"variant": "toy", "kwargs": {"width": 8}, "stage": "finetune", "step": 7}, url)
    loaded, config = read_export(url)
    assert config == {
        "format": "spikformer-export/1",
        "variant": "toy",
        "kwargs": {"width": 8},
        "stage": "finetune",
        "step": 7,
        "weights_sha256": digest,
    }
    fresh = ToyNet(**config["kwargs"])
    fresh.load_state_dict(loaded, strict=True)
    for name, value in state.items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert loaded["stem.1.num_batches_tracked"].dtype == torch.int64
    assert export_digest(url) == digest
    fs, root = fsspec.core.url_to_fs(url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [
        "config.json",
        "model.safetensors",
    ]
    with fs.open(root + "/model.safetensors", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest


def test_floats_are_written_as_fp32(tmp_path):
    state = {"w": torch.ones(2, 3, dtype=torch.bfloat16), "n": torch.tensor(3)}
    write_export(state, {"variant": "toy", "kwargs": {}}, str(tmp_path))
    loaded, _ = read_export(str(tmp_path))
    assert loaded["w"].dtype == torch.float32 and loaded["n"].dtype == torch.int64


def test_config_needs_variant_and_kwargs(tmp_path):
    with pytest.raises(PipelineError, match="variant"):
        write_export({"w": torch.ones(1)}, {"kwargs": {}}, str(tmp_path))
    with pytest.raises(PipelineError, match="kwargs"):
        write_export({"w": torch.ones(1)}, {"variant": "toy", "kwargs": None}, str(tmp_path))
    with pytest.raises(PipelineError, match="'w'"):
        write_export({"w": [1.0]}, {"variant": "toy", "kwargs": {}}, str(tmp_path))
    assert not (tmp_path / "config.json").exists()


def test_missing_or_foreign_export_is_named(tmp_path):
    with pytest.raises(PipelineError, match="config.json not found"):
        read_export(str(tmp_path / "nothing"))
    (tmp_path / "config.json").write_text(json.dumps({"format": "other/2"}))
    with pytest.raises(PipelineError, match="other/2"):
        read_export(str(tmp_path))


def test_torn_reexport_is_detected(tmp_path):
    write_export({"w": torch.zeros(3)}, {"variant": "toy", "kwargs": {}}, str(tmp_path))
    config = (tmp_path / "config.json").read_text()
    write_export({"w": torch.ones(3)}, {"variant": "toy", "kwargs": {}}, str(tmp_path))
    (tmp_path / "config.json").write_text(config)  # as if the second export died before its config.json
    with pytest.raises(PipelineError, match="torn"):
        read_export(str(tmp_path))
