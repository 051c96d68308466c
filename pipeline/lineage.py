"""Lineage between stage runs: which dataset and which upstream run/artifact a stage consumed.

Recorded as plain run tags (readable in the UI, searchable, cheap to walk over HTTP) plus an MLflow
dataset input for the manifest, so `mlflow ui` shows the dataset on the run's page.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

FINGERPRINT = "fingerprint"
UPSTREAM_RUN_ID = "lineage.upstream_run_id"
UPSTREAM_ARTIFACT_URI = "lineage.upstream_artifact_uri"
DATASET_DIGEST = "lineage.dataset_digest"
DATASET_URL = "lineage.dataset_url"
UPSTREAM_REFERENCE = "lineage.upstream_reference"  # what the spec said (runs:/..., models:/..., job:...)
# set on a finished stage run: where its export lives and the sha256 of its weights (stage caching)
EXPORT_URL = "pipeline.export_url"
EXPORT_DIGEST = "pipeline.export_digest"
# MLflow's datasets table keeps digests in a 36-character column (strict on Postgres/MySQL); the
# full manifest digest stays in the lineage.dataset_digest tag.
MLFLOW_DIGEST_LENGTH = 36


class LineageLink(NamedTuple):
    """One step of a lineage walk, newest first."""

    stage: str
    run_id: str
    dataset_digest: str | None
    dataset_url: str | None
    upstream_artifact_uri: str | None


class FsspecDatasetSource(DatasetSource):
    """Source for URLs MLflow has no resolver for (memory://, az://, ...); only records the URL."""

    def __init__(self, url: str) -> None:
        self.url = url

    @staticmethod
    def _get_source_type() -> str:
        return "fsspec"

    def load(self, dst_path: str | None = None) -> str:
        """Copy the manifest to `dst_path` (default: a new temp folder) and return the local file."""
        import os
        import tempfile

        import fsspec

        folder = dst_path or tempfile.mkdtemp(prefix="dataset-")
        local = os.path.join(folder, os.path.basename(self.url.rstrip("/")) or "manifest.json")
        with fsspec.open(self.url, "rb") as src, open(local, "wb") as dst:
            dst.write(src.read())
        return local

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return isinstance(raw_source, str) and "://" in raw_source

    @classmethod
    def _resolve(cls, raw_source: Any) -> FsspecDatasetSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> FsspecDatasetSource:
        return cls(source_dict["url"])


def dataset_source(url: str) -> DatasetSource:
    """MLflow's own source type for http(s)/s3/gs/local URLs, else a plain fsspec URL record."""
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(url)
    except MlflowException:
        return FsspecDatasetSource(url)


def log_dataset(
    client: MlflowClient,
    run_id: str,
    url: str,
    digest: str,
    context: str,
    name: str | None = None,
    primary: bool = True,
) -> None:
    """A manifest as a run input (source URL, digest, context = the stage's use of it)."""
    if not digest:
        raise PipelineError(f"dataset {url}: empty manifest digest")
    name = name or _name_from_url(url)
    dataset = MetaDataset(source=dataset_source(url), name=name, digest=digest[:MLFLOW_DIGEST_LENGTH])
    entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    client.log_inputs(run_id, datasets=[entry])
    if primary:
        client.log_batch(run_id, tags=[RunTag(DATASET_DIGEST, digest), RunTag(DATASET_URL, url)])


def _name_from_url(url: str) -> str:
    """`.../digits/train/manifest.json` -> `digits/train`: the folders say what the data is."""
    parts = [p for p in url.split("://", 1)[-1].split("/") if p]
    if parts and "." in parts[-1]:
        parts = parts[:-1]
    return "/".join(parts[-2:]) or url


def find_finished_run(
    client: MlflowClient, experiment_id: str, stage_tag: str, stage: str, fingerprint: str
) -> Run | None:
    """Newest run of `stage` with this fingerprint whose status is FINISHED (never RUNNING/FAILED)."""
    query = (
        f"tags.`{stage_tag}` = '{_quote(stage)}' and tags.{FINGERPRINT} = '{_quote(fingerprint)}' "
        "and attributes.status = 'FINISHED'"
    )
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def walk(client: MlflowClient, run_id: str, stage_tag: str, max_depth: int = 32) -> list[LineageLink]:
    """From a stage run back through lineage.upstream_run_id tags; stops at a run without upstream."""
    chain: list[LineageLink] = []
    seen: set[str] = set()
    current: str | None = run_id
    while current is not None:
        if current in seen or len(chain) >= max_depth:
            raise PipelineError(
                f"lineage of run {run_id} loops or is deeper than {max_depth} at run {current}"
            )
        seen.add(current)
        try:
            run = client.get_run(current)
        except MlflowException as exc:
            raise PipelineError(f"lineage of run {run_id}: upstream run {current} not found: {exc}") from None
        tags = run.data.tags
        digest, url = tags.get(DATASET_DIGEST), tags.get(DATASET_URL)
        if digest is None and run.inputs and run.inputs.dataset_inputs:
            first = run.inputs.dataset_inputs[0].dataset
            digest, url = first.digest, first.source
        chain.append(
            LineageLink(
                tags.get(stage_tag, run.info.run_name or ""),
                current,
                digest,
                url,
                tags.get(UPSTREAM_ARTIFACT_URI),
            )
        )
        current = tags.get(UPSTREAM_RUN_ID)
    return chain
