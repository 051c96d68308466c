"""Tracking against a real sqlite MLflow store: run tree, datasets, lineage walk, stage caching."""

from __future__ import annotations

import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from lineage_chain import (
    PRETRAIN_DIGEST,
    PRETRAIN_URL,
    TRAIN_DIGEST,
    TRAIN_URL,
    VAL_DIGEST,
    VAL_URL,
    free_port,
    log_from_worker,
)
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from PIL import Image
from pydantic import SecretStr

from pipeline import lineage
from pipeline.config import MlflowSettings
from pipeline.errors import PipelineError
from pipeline.tracking import STAGE_TAG, Tracker, check_reachable, prepare, resolve_tracking_uri


def test_chain_is_a_run_tree_with_datasets_and_lineage(sqlite_tracker, export_dir, chain_writer):
    chain = chain_writer(sqlite_tracker, export_dir)
    client = sqlite_tracker.client

    for stage, run_id in (
        ("pretrain", chain.pretrain),
        ("finetune", chain.finetune),
        ("evaluate", chain.evaluate),
    ):
        run = client.get_run(run_id)
        assert run.data.tags[MLFLOW_PARENT_RUN_ID] == chain.job
        assert run.data.tags[STAGE_TAG] == stage
        assert run.info.status == "FINISHED"
    assert client.get_run(chain.job).info.status == "FINISHED"

    finetune = client.get_run(chain.finetune)
    assert finetune.data.params == {"epochs": "1"}
    inputs = {d.dataset.source: d for d in finetune.inputs.dataset_inputs}
    assert set(inputs) == {f'{{"uri": "{TRAIN_URL}"}}', f'{{"uri": "{VAL_URL}"}}'}
    train = inputs[f'{{"uri": "{TRAIN_URL}"}}']
    assert train.dataset.digest == TRAIN_DIGEST[: lineage.MLFLOW_DIGEST_LENGTH]
    assert train.dataset.name == "digits/train"
    assert [(t.key, t.value) for t in train.tags] == [("mlflow.data.context", "train")]
    assert finetune.data.tags[lineage.DATASET_DIGEST] == TRAIN_DIGEST  # the val input is not primary

    pretrain = client.get_run(chain.pretrain)
    (dataset,) = pretrain.inputs.dataset_inputs
    assert dataset.dataset.source_type == "fsspec"  # memory:// has no MLflow resolver
    history = client.get_metric_history(chain.pretrain, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_lineage_walk_reaches_the_dataset(sqlite_tracker, export_dir, chain_writer):
    chain = chain_writer(sqlite_tracker, export_dir)
    walked = sqlite_tracker.lineage_chain(chain.evaluate)
    assert [(link.stage, link.run_id, link.dataset_digest, link.dataset_url) for link in walked] == [
        ("evaluate", chain.evaluate, VAL_DIGEST, VAL_URL),
        ("finetune", chain.finetune, TRAIN_DIGEST, TRAIN_URL),
        ("pretrain", chain.pretrain, PRETRAIN_DIGEST, PRETRAIN_URL),
    ]
    assert walked[0].upstream_artifact_uri == chain.finetune_export_uri
    assert walked[1].upstream_artifact_uri == chain.pretrain_export_uri
    assert walked[2].upstream_artifact_uri is None
    exported = Path(chain.pretrain_export_uri.removeprefix("file://")) / "model.safetensors"
    assert exported.read_bytes() == (export_dir / "model.safetensors").read_bytes()


def test_lineage_walk_detects_a_loop(sqlite_tracker):
    job = sqlite_tracker.start_job_run("loop")
    a = sqlite_tracker.start_stage_run(job, "a", "fa")
    b = sqlite_tracker.start_stage_run(job, "b", "fb")
    sqlite_tracker.set_upstream(a, b, "x")
    sqlite_tracker.set_upstream(b, a, "y")
    with pytest.raises(PipelineError, match="loops"):
        sqlite_tracker.lineage_chain(a)


def test_find_finished_stage_ignores_running_failed_and_other_fingerprints(sqlite_tracker):
    tracker = sqlite_tracker
    job = tracker.start_job_run("cache")
    running = tracker.start_stage_run(job, "finetune", "fp-1")
    failed = tracker.start_stage_run(job, "finetune", "fp-1")
    tracker.finish_run(failed, "FAILED")
    killed = tracker.start_stage_run(job, "finetune", "fp-1")
    tracker.finish_run(killed, "KILLED")
    assert tracker.find_finished_stage("finetune", "fp-1") is None

    other = tracker.start_stage_run(job, "finetune", "fp-2")
    tracker.finish_run(other)
    other_stage = tracker.start_stage_run(job, "evaluate", "fp-1")
    tracker.finish_run(other_stage)
    assert tracker.find_finished_stage("finetune", "fp-1") is None

    tracker.finish_run(running)
    found = tracker.find_finished_stage("finetune", "fp-1")
    assert found is not None and found.info.run_id == running
    assert tracker.find_finished_stage("finetune", "fp-2").info.run_id == other


def test_values_images_and_artifacts(sqlite_tracker, tmp_path):
    import torch

    tracker = sqlite_tracker
    run = tracker.start_stage_run(tracker.start_job_run("files"), "pretrain", "fp")
    tracker.log_metrics(run, {"loss": torch.tensor(0.25), "step_time": 2}, step=7)
    metrics = tracker.get_run(run).data.metrics
    assert metrics == {"loss": 0.25, "step_time": 2.0}
    with pytest.raises(PipelineError, match="'acc'.*not a number"):
        tracker.log_metrics(run, {"acc": "high"})

    many = {f"p{i}": i for i in range(250)} | {"long": "x" * 7000}
    tracker.log_params(run, many)
    params = tracker.get_run(run).data.params
    assert len(params) == 251 and params["p249"] == "249" and len(params["long"]) == 6000

    tracker.log_image(run, Image.new("RGB", (4, 4), "red"), "confusion")
    png = tmp_path / "rates.png"
    Image.new("L", (4, 4)).save(png)
    tracker.log_image(run, png, "firing_rates")
    tracker.log_image(run, Image.new("RGB", (4, 4)), "reconstruction", step=3)
    images = {f.path for f in tracker.client.list_artifacts(run, "images")}
    assert {"images/confusion.png", "images/rates.png"} <= images
    assert any(p.startswith("images/reconstruction+step+3+") for p in images)
    with pytest.raises(PipelineError, match="does not exist"):
        tracker.log_image(run, tmp_path / "missing.png", "x")

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "eval.json").write_text("{}")
    dir_uri = tracker.log_artifacts(run, tmp_path / "report", "report")
    file_uri = tracker.log_artifacts(run, png, "plots")
    assert dir_uri.endswith("/artifacts/report") and file_uri.endswith("/artifacts/plots/rates.png")
    assert Path(file_uri.removeprefix("file://")).is_file()


def test_prepare_is_idempotent_and_tracker_pickles(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    settings = MlflowSettings(tracking_uri=f"sqlite:///{tmp_path}/a/b/mlflow.db", experiment="twice")
    first, second = prepare(settings), prepare(settings)
    assert first == second
    assert (tmp_path / "a" / "b" / "mlflow.db").is_file()

    secret = Tracker(first.tracking_uri, first.experiment_id, "alice", SecretStr("hunter2-secret"))
    assert "hunter2" not in repr(secret)
    clone = pickle.loads(pickle.dumps(secret))
    assert clone.password.get_secret_value() == "hunter2-secret"


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(MlflowSettings()) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(MlflowSettings()) == "http://mlflow.example:5000"
    assert (
        resolve_tracking_uri(MlflowSettings(tracking_uri="sqlite:///rel/x.db"))
        == f"sqlite:///{tmp_path}/rel/x.db"
    )
    assert resolve_tracking_uri(MlflowSettings(tracking_uri="sqlite:////abs/x.db")) == "sqlite:////abs/x.db"


def test_unreachable_server_is_one_clear_error_before_anything_else(tmp_path):
    port = free_port()  # nothing listens here any more
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        prepare(MlflowSettings(tracking_uri=f"http://127.0.0.1:{port}"))
    assert str(info.value).startswith(f"MLflow tracking server http://127.0.0.1:{port} unreachable: ")
    assert "\n" not in str(info.value)
    assert time.monotonic() - started < 10


def test_silent_server_times_out(tmp_path):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PipelineError, match="unreachable: ReadTimeout"):
            check_reachable(f"http://127.0.0.1:{port}", timeout_s=0.5)


def test_refused_credentials_and_server_errors_are_named():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(401 if self.headers.get("Authorization") is None else 503)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(PipelineError, match=r"refused the credentials \(HTTP 401\)"):
            check_reachable(url)
        with pytest.raises(PipelineError, match="unhealthy: HTTP 503"):
            check_reachable(url, auth=("alice", "pw"))
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_are_exported_for_the_rest_client(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    settings = MlflowSettings(
        tracking_uri=f"sqlite:///{tmp_path}/m.db", username="alice", password=SecretStr("pw-123")
    )
    prepare(settings)
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw-123"


def test_register_rejects_a_folder_that_is_not_an_export(sqlite_tracker, tmp_path):
    run = sqlite_tracker.start_stage_run(sqlite_tracker.start_job_run("reg"), "finetune", "fp")
    with pytest.raises(PipelineError, match="not an export"):
        sqlite_tracker.register_classifier(run, tmp_path, "clf")


def test_remote_fsspec_outputs_are_uploaded(sqlite_tracker, export_dir):
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("model.safetensors", "config.json"):
        fs.pipe(f"/exports/pretrain/{name}", (export_dir / name).read_bytes())
    run = sqlite_tracker.start_stage_run(sqlite_tracker.start_job_run("remote"), "pretrain", "fp")
    uri = sqlite_tracker.log_artifacts(run, "memory://exports/pretrain", "export")
    uploaded = Path(uri.removeprefix("file://"))
    assert sorted(p.name for p in uploaded.iterdir()) == ["config.json", "model.safetensors"]
    assert (uploaded / "model.safetensors").read_bytes() == (export_dir / "model.safetensors").read_bytes()
    with pytest.raises(PipelineError, match="does not exist"):
        sqlite_tracker.log_artifacts(run, "memory://exports/missing", "export")


def test_worker_processes_log_into_the_prepared_store(sqlite_tracker):
    import multiprocessing

    job = sqlite_tracker.start_job_run("workers")
    runs = [sqlite_tracker.start_stage_run(job, f"stage{rank}", "fp") for rank in range(2)]
    context = multiprocessing.get_context("spawn")  # like Ray workers: nothing inherited but the pickle
    workers = [
        context.Process(target=log_from_worker, args=(sqlite_tracker, run, r)) for r, run in enumerate(runs)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    for rank, run_id in enumerate(runs):
        run = sqlite_tracker.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics == {"loss": 19.0, "rank": float(rank)}
        assert len(sqlite_tracker.client.get_metric_history(run_id, "loss")) == 20
