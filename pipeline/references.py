"""Exports named the way MLflow users name models: resolve a spec's reference to an export URL.

`stages.finetune.init` and `stages.evaluate.export` accept
- an export folder URL (or a .safetensors file), used as it is;
- `runs:/<run_id>/export`: the export of that stage run;
- `models:/<name>/<version>` and `models:/<name>@<alias>`: the run a registered version came from;
- `job:<job name>`: the export of that job's newest FINISHED run of the consuming stage's upstream
  kind (pretrain for finetune.init, finetune for evaluate.export), including a run that job reused
  from the stage cache.
A run's export is the URL in its `pipeline.export_url` tag while that folder still exists, else its
logged `export` artifact, downloaded once into `{output_root}/imported/<run_id>/`. A reference that
resolves to nothing is one PipelineError naming the key, the reference and what does exist.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import fsspec
from mlflow.exceptions import MlflowException

from pipeline import lineage
from pipeline.data.fsutil import join_url
from pipeline.errors import PipelineError
from pipeline.redact import redact_url
from pipeline.tracking import JOB_TAG, STAGE_TAG, Tracker

logger = logging.getLogger(__name__)

SCHEMES = ("runs:/", "models:/", "job:")
EXPORT_ARTIFACT = "export"


@dataclass(frozen=True)
class ResolvedExport:
    url: str
    run_id: str | None  # the stage run that wrote it (None for a plain URL)
    reference: str  # what the spec said


def is_reference(value: str) -> bool:
    return value.startswith(SCHEMES)


def resolve_export(reference: str, key: str, kind: str, tracker: Tracker | None, output_root: str) -> ResolvedExport:
    """`kind` is the stage whose export is wanted (pretrain or finetune)."""
    if not is_reference(reference):
        return ResolvedExport(reference, None, reference)
    if tracker is None:
        raise PipelineError(f"{key}: {reference} needs the MLflow store, which is unreachable")
    where = f"{key}: {reference}"
    if reference.startswith("runs:/"):
        run_id, _, path = reference[len("runs:/"):].partition("/")
        if not run_id or path.strip("/") != EXPORT_ARTIFACT:
            raise PipelineError(f"{where}: expected runs:/<run_id>/{EXPORT_ARTIFACT}")
        run = _get_run(tracker, run_id, where)
    elif reference.startswith("models:/"):
        run = _get_run(tracker, _model_version_run(tracker, reference[len("models:/"):], where), where)
    else:
        run = _newest_job_run(tracker, reference[len("job:"):], kind, where)
    return ResolvedExport(_export_of(tracker, run, where, output_root), run.info.run_id, reference)


def _get_run(tracker: Tracker, run_id: str, where: str):
    try:
        return tracker.get_run(run_id)
    except MlflowException:
        store = redact_url(tracker.tracking_uri)
        raise PipelineError(f"{where}: no run {run_id} in the MLflow store {store}") from None


def _model_version_run(tracker: Tracker, spec: str, where: str) -> str:
    client = tracker.client
    name, at, alias = spec.partition("@")
    if not at:
        name, _, version = spec.rpartition("/")
        if not name or not version:
            raise PipelineError(f"{where}: expected models:/<name>/<version> or models:/<name>@<alias>")
    try:
        found = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, version)
    except MlflowException:
        raise PipelineError(f"{where}: not in the model registry; {_registered(client, name)}") from None
    if not found.run_id:
        raise PipelineError(f"{where}: the registered version has no run to take the export from")
    return found.run_id


def _registered(client, name: str) -> str:
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        versions = []
    if not versions:
        models = sorted(m.name for m in client.search_registered_models())
        return f"registered models: {', '.join(models) or 'none'}"
    try:
        aliases = sorted(client.get_registered_model(name).aliases or {})
    except MlflowException:
        aliases = []
    listed = ", ".join(sorted((str(v.version) for v in versions), key=int))
    return f"model {name} has versions {listed}" + (f" and aliases {', '.join(aliases)}" if aliases else "")


def _newest_job_run(tracker: Tracker, job_name: str, kind: str, where: str):
    """The newest FINISHED `kind` stage run that job `job_name` ran or reused."""
    client, quoted = tracker.client, job_name.replace("'", "\\'")
    ran = client.search_runs(
        [tracker.experiment_id],
        f"tags.`{JOB_TAG}` = '{quoted}' and tags.`{STAGE_TAG}` = '{kind}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    candidates = [(r.info.end_time or r.info.start_time, r) for r in ran]
    reused_tag = f"pipeline.{kind}.reused_run_id"
    job_runs = client.search_runs(
        [tracker.experiment_id], f"tags.`{JOB_TAG}` = '{quoted}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=50)
    for job_run in job_runs:
        if reused_tag in job_run.data.tags:
            candidates.append((job_run.info.start_time, _get_run(tracker, job_run.data.tags[reused_tag], where)))
            break
    if not candidates:
        jobs = client.search_runs([tracker.experiment_id],
                                  f"tags.`{STAGE_TAG}` = '{kind}' and attributes.status = 'FINISHED'",
                                  max_results=200)
        names = sorted({r.data.tags.get(JOB_TAG, "") for r in jobs} - {""})
        store = redact_url(tracker.tracking_uri)
        raise PipelineError(f"{where}: no FINISHED {kind} run of job {job_name!r} in {store}; "
                            f"jobs with finished {kind} runs: {', '.join(names) or 'none'}")
    return max(candidates, key=lambda pair: pair[0])[1]


def _export_of(tracker: Tracker, run, where: str, output_root: str) -> str:
    tags = run.data.tags
    url = tags.get(lineage.EXPORT_URL)
    if url and export_exists(url):
        return url
    local_root = output_root if "://" not in output_root else tempfile.mkdtemp(prefix="imported-")
    target = join_url(local_root, "imported", run.info.run_id)
    if export_exists(join_url(target, EXPORT_ARTIFACT)):
        return join_url(target, EXPORT_ARTIFACT)
    import mlflow

    try:
        os.makedirs(target, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target) as tmp:  # renamed into place only when complete
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=EXPORT_ARTIFACT,
                                                dst_path=tmp, tracking_uri=tracker.tracking_uri)
            os.replace(os.path.join(tmp, EXPORT_ARTIFACT), os.path.join(target, EXPORT_ARTIFACT))
    except (MlflowException, OSError) as err:
        stage = tags.get(STAGE_TAG, "?")
        raise PipelineError(f"{where}: run {run.info.run_id} ({stage}) has no export: no readable "
                            f"{lineage.EXPORT_URL} tag and no '{EXPORT_ARTIFACT}' artifact ({err})") from None
    logger.info("%s: downloaded the export of run %s into %s", where, run.info.run_id, target)
    return join_url(target, EXPORT_ARTIFACT)


def export_exists(url: str) -> bool:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(join_url(path, "config.json")) or (url.endswith(".safetensors") and fs.exists(path))
    except Exception:  # noqa: BLE001 - an unreadable location is one that does not exist for us
        return False
