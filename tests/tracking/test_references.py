"""Export references (runs:/, models:/, job:) against a real sqlite MLflow store."""

from __future__ import annotations

import shutil

import pytest

from pipeline import lineage
from pipeline.errors import PipelineError
from pipeline.references import resolve_export
from pipeline.train.export import export_digest

KEY = "stages.evaluate.export"


def finished_stage_run(tracker, job: str, stage: str, export: str, fingerprint: str = "fp") -> str:
    """A stage run as the runner leaves it: export tag + `export` artifact, FINISHED."""
    job_run = tracker.start_job_run(job)
    run_id = tracker.start_stage_run(job_run, stage, fingerprint)
    tracker.log_artifacts(run_id, export, "export")
    tracker.set_tags(run_id, {lineage.EXPORT_URL: export})
    tracker.finish_run(run_id, "FINISHED")
    tracker.finish_run(job_run, "FINISHED")
    return run_id


@pytest.fixture
def exported(sqlite_tracker, export_dir, tmp_path):
    copy = tmp_path / "exports" / "ft"
    shutil.copytree(export_dir, copy)
    return sqlite_tracker, str(copy), finished_stage_run(sqlite_tracker, "ft-job", "finetune", str(copy))


def test_a_plain_url_is_used_as_it_is(tmp_path):
    found = resolve_export("s3://bucket/x/export", KEY, "finetune", None, str(tmp_path))
    assert (found.url, found.run_id) == ("s3://bucket/x/export", None)


def test_runs_uri_gives_the_runs_export(exported, tmp_path):
    tracker, url, run_id = exported
    found = resolve_export(f"runs:/{run_id}/export", KEY, "finetune", tracker, str(tmp_path))
    assert (found.url, found.run_id, found.reference) == (url, run_id, f"runs:/{run_id}/export")


def test_a_vanished_export_folder_is_downloaded_from_the_runs_artifact(exported, tmp_path):
    tracker, url, run_id = exported
    digest = export_digest(url)
    shutil.rmtree(url)
    found = resolve_export(f"runs:/{run_id}/export", KEY, "finetune", tracker, str(tmp_path / "out"))
    assert found.url == f"{tmp_path}/out/imported/{run_id}/export"
    assert export_digest(found.url) == digest
    again = resolve_export(f"runs:/{run_id}/export", KEY, "finetune", tracker, str(tmp_path / "out"))
    assert again.url == found.url  # downloaded once


def test_models_uri_by_version_and_alias(exported, tmp_path):
    tracker, url, run_id = exported
    name = f"refs-{run_id[:8]}"
    version = tracker.register_classifier(run_id, url, name)
    tracker.client.set_registered_model_alias(name, "champion", version.version)
    for ref in (f"models:/{name}/{version.version}", f"models:/{name}@champion"):
        found = resolve_export(ref, KEY, "finetune", tracker, str(tmp_path))
        assert (found.url, found.run_id) == (url, run_id), ref
    with pytest.raises(PipelineError, match=rf"{KEY}: models:/{name}/7: not in the model registry; "
                                            rf"model {name} has versions 1 and aliases champion"):
        resolve_export(f"models:/{name}/7", KEY, "finetune", tracker, str(tmp_path))


def test_job_reference_takes_the_newest_finished_run_including_a_reused_one(exported, tmp_path, export_dir):
    tracker, url, run_id = exported
    assert resolve_export("job:ft-job", KEY, "finetune", tracker, str(tmp_path)).run_id == run_id
    newer_copy = tmp_path / "exports" / "newer"
    shutil.copytree(export_dir, newer_copy)
    newer = finished_stage_run(tracker, "other-job", "finetune", str(newer_copy), fingerprint="fp2")
    reusing = tracker.start_job_run("ft-job")  # a later run of ft-job whose finetune came from the cache
    tracker.set_tags(reusing, {"pipeline.finetune.reused_run_id": newer})
    tracker.finish_run(reusing, "FINISHED")
    found = resolve_export("job:ft-job", KEY, "finetune", tracker, str(tmp_path))
    assert (found.url, found.run_id) == (str(newer_copy), newer)


def test_a_reference_to_nothing_is_one_clear_error(exported, tmp_path):
    tracker, _, _ = exported
    cases = {
        "runs:/0123abcd/export": f"{KEY}: runs:/0123abcd/export: no run 0123abcd in the MLflow store",
        "runs:/0123abcd/model": f"{KEY}: runs:/0123abcd/model: expected runs:/<run_id>/export",
        "models:/nobody/1": f"{KEY}: models:/nobody/1: not in the model registry; registered models:",
        "job:nobody": f"{KEY}: job:nobody: no FINISHED finetune run of job 'nobody' in sqlite:",
        "job:ft-job": f"{KEY}: job:ft-job: no FINISHED pretrain run of job 'ft-job'",
    }
    for ref, start in cases.items():
        kind = "pretrain" if ref == "job:ft-job" else "finetune"
        with pytest.raises(PipelineError) as info:
            resolve_export(ref, KEY, kind, tracker, str(tmp_path))
        assert str(info.value).startswith(start) and "\n" not in str(info.value), str(info.value)
    assert "jobs with finished finetune runs: ft-job" in _error("job:nobody", tracker, tmp_path)
    with pytest.raises(PipelineError, match="needs the MLflow store, which is unreachable"):
        resolve_export("job:ft-job", KEY, "finetune", None, str(tmp_path))


def _error(ref, tracker, tmp_path) -> str:
    with pytest.raises(PipelineError) as info:
        resolve_export(ref, KEY, "finetune", tracker, str(tmp_path))
    return str(info.value)
