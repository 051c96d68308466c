"""The same chain through a real `mlflow server` over HTTP: lineage walk, artifact download,
model registry round trip (register, load through pyfunc, predict)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from lineage_chain import PRETRAIN_DIGEST, PRETRAIN_URL, TRAIN_DIGEST, VAL_DIGEST, write_chain
from mlflow.tracking import MlflowClient

from pipeline.config import MlflowSettings
from pipeline.tracking import prepare


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server_chain(mlflow_server, export_dir):
    tracker = prepare(MlflowSettings(tracking_uri=mlflow_server, experiment="over-http"))
    return tracker, write_chain(tracker, export_dir)


def test_lineage_walk_over_http_and_export_download(server_chain, mlflow_server, export_dir, tmp_path):
    tracker, chain = server_chain
    assert chain.pretrain_export_uri.startswith("mlflow-artifacts:/")  # proxied by the server

    walked = tracker.lineage_chain(chain.evaluate)
    assert [(link.stage, link.run_id) for link in walked] == [
        ("evaluate", chain.evaluate),
        ("finetune", chain.finetune),
        ("pretrain", chain.pretrain),
    ]
    assert [link.dataset_digest for link in walked] == [VAL_DIGEST, TRAIN_DIGEST, PRETRAIN_DIGEST]
    assert walked[-1].dataset_url == PRETRAIN_URL

    # A different process would do just this: a plain client, the artifact URI from the lineage tag.
    client = MlflowClient(mlflow_server)
    consumed = walked[1].upstream_artifact_uri
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{consumed}/model.safetensors", dst_path=str(tmp_path), tracking_uri=mlflow_server
    )
    assert sha256(Path(local)) == sha256(export_dir / "model.safetensors")
    by_run = client.download_artifacts(chain.pretrain, "export/config.json", str(tmp_path / "by_run"))
    assert json.loads(Path(by_run).read_text())["variant"] == "test_resnet"

    assert tracker.find_finished_stage("finetune", "fp-fine").info.run_id == chain.finetune
    assert tracker.find_finished_stage("finetune", "fp-other") is None


def test_registered_classifier_loads_and_predicts(server_chain, mlflow_server, export_dir, monkeypatch):
    import timm
    import torch
    from safetensors.torch import load_file

    tracker, chain = server_chain
    version = tracker.register_classifier(chain.finetune, export_dir, "spikformer-test")
    client = MlflowClient(mlflow_server)
    stored = client.get_model_version("spikformer-test", version.version)
    assert stored.run_id == chain.finetune
    assert stored.tags["source_run_id"] == chain.finetune
    assert chain.finetune in stored.description

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    loaded = mlflow.pyfunc.load_model(f"models:/spikformer-test/{version.version}")
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    logits = loaded.predict(images)

    reference = timm.create_model("test_resnet", num_classes=3)
    reference.load_state_dict(load_file(str(export_dir / "model.safetensors")))
    with torch.inference_mode():
        expected = reference.eval()(torch.from_numpy(images)).numpy()
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
