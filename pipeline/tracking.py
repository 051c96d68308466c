"""MLflow tracking with explicit run ids: one parent run per job run, one child run per stage.

Everything goes through `MlflowClient` and a run id, never through MLflow's global "active run",
so the same `Tracker` (a small picklable value) works in the driver and in Ray workers. Only the
driver creates the store and experiment (`prepare`): several processes creating a fresh sqlite DB
at once crash in MLflow's migrations. Only rank 0 of a stage should call the logging methods.

A tracking server that stops answering: MLflow's own HTTP retries are bounded (`HTTP_SETTINGS`, set
as defaults in every process that talks to the store), so one call fails within seconds instead of
minutes. The driver's tracker (`outage_wait_s` > 0) then waits for the server, probing its /health,
for at most that long before raising `TrackingUnavailable`; rank 0's metrics never wait at all
(`pipeline.tracking_sink` sends them from a thread and journals what it cannot send,
`pipeline.tracking_journal`).

Lineage (upstream run, dataset, fingerprint tags and the chain walk) is in `pipeline.lineage`;
model registration in `pipeline.registry`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import requests
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from pydantic import SecretStr

from pipeline import lineage
from pipeline.config import MLFLOW_MAX_PARAM_LENGTH, MlflowSettings
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from PIL.Image import Image

logger = logging.getLogger(__name__)

RunEnd = Literal["FINISHED", "FAILED", "KILLED"]
STAGE_TAG = "pipeline.stage"
JOB_TAG = "pipeline.job"
ERROR_TAG = "pipeline.error"  # the one-line error of a FAILED run
RESUMES_TAG = "pipeline.resumes"  # how many times an interrupted run was continued
SUPERSEDED_TAG = "pipeline.superseded_by"  # on a stale run ended KILLED: the run that took over
SPEC_TAG = "pipeline.spec_digest"  # a job run's resolved spec + stage selection: the same job again
STOPPED_TAG = "pipeline.stopped_by"  # on a run ended KILLED because the driver could not go on (one line)
REACHABILITY_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 2.0  # one /health probe while the server is away
PROBE_EVERY_S = 3.0
# MLflow's HTTP client defaults to 7 retries with exponential backoff and a 120 s timeout: about four
# minutes per call against a dead server. These bound one call to seconds (refused) or a minute (hung);
# outages are ridden out by the driver's probing wait and the sink's journal instead. Set as defaults:
# a value already in the environment wins.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


# --------------------------------------------------------------------------- where the store is


def resolve_tracking_uri(settings: MlflowSettings) -> str:
    """settings.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<abs cwd>/mlflow.db.

    Relative sqlite paths are made absolute so Ray workers (other working directories) find the
    same database file.
    """
    uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path.cwd() / uri[len(prefix) :])
    return uri


def check_reachable(
    uri: str, timeout_s: float = REACHABILITY_TIMEOUT_S, auth: tuple[str, str] | None = None
) -> None:
    """For http(s) stores, fail fast with one clear line when the server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s, auth=auth)
    except requests.RequestException as exc:
        reason = exc.__class__.__name__
        detail = str(exc.args[0]) if exc.args else ""
        raise PipelineError(f"MLflow tracking server {uri} unreachable: {reason}: {detail[:200]}") from None
    if response.status_code in (401, 403):
        raise PipelineError(
            f"MLflow tracking server {uri} refused the credentials (HTTP {response.status_code}); "
            "set mlflow.username/password in the job or MLFLOW_TRACKING_USERNAME/PASSWORD"
        )
    if response.status_code >= 500:
        raise PipelineError(f"MLflow tracking server {uri} is unhealthy: HTTP {response.status_code}")


def export_credentials(username: str | None, password: SecretStr | None) -> None:
    """MLflow's REST client reads basic-auth credentials from these variables at request time."""
    if username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = username
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password.get_secret_value()


def bound_http_waits() -> None:
    for key, value in HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)


class TrackingUnavailable(PipelineError):
    """The tracking store did not answer within the driver's outage wait."""


def is_outage(err: BaseException) -> bool:
    """True when `err` says the store could not be reached (refused, reset, timed out, 5xx after MLflow's
    retries, a locked or unreadable sqlite file), as opposed to the store rejecting a request."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, TrackingUnavailable | requests.ConnectionError | requests.Timeout | ConnectionError
                      | TimeoutError):
            return True
        text = str(err)
        if type(err).__name__ == "OperationalError" or any(
                marker in text for marker in ("Max retries exceeded", "Connection refused", "Connection aborted",
                                              "timeout exception", "Read timed out", "RemoteDisconnected",
                                              "too many 5", "Connection reset")):
            return True
        err = err.__cause__ or err.__context__
    return False


def answers(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One quick probe: does the store answer now? (Anything but http(s) is a local store: yes.)"""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).status_code < 500
    except requests.RequestException:
        return False


class _Outage:
    """Per store, in one process: whether the driver already gave up waiting for it (later calls then
    fail at once instead of each waiting again), and the console lines said once per outage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gave_up = False

    def ride_out(self, uri: str, wait_s: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            self.gave_up = False  # it answers again
            return result
        except Exception as err:
            if not is_outage(err):
                raise
            first = err
        reason = outage_reason(first)
        if self.gave_up:
            raise TrackingUnavailable(f"MLflow tracking server {uri} unreachable ({reason})") from None
        with self.lock:
            logger.warning("MLflow tracking server %s is not answering (%s): waiting up to %.0f s for it",
                           uri, reason, wait_s)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if answers(uri):
                    try:
                        result = fn(*args, **kwargs)
                    except Exception as err:
                        if not is_outage(err):
                            raise
                        reason = outage_reason(err)
                    else:
                        logger.info("MLflow tracking server %s answers again", uri)
                        return result
                time.sleep(PROBE_EVERY_S)
            self.gave_up = True
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} unreachable for {wait_s:.0f} s ({reason})") from None


_OUTAGES: dict[str, _Outage] = {}


def outage_reason(err: BaseException) -> str:
    """`ConnectionRefusedError` rather than MLflow's 300-character wrapper of urllib3's message."""
    text = str(err)
    for marker in ("Connection refused", "Read timed out", "RemoteDisconnected", "Connection reset",
                   "too many 5", "database is locked"):
        if marker in text:
            return marker
    return f"{type(err).__name__}: {text.splitlines()[0][:120] if text else ''}"


class _PatientClient:
    """An MlflowClient whose every call rides out an outage of the server (the driver's client)."""

    def __init__(self, client: MlflowClient, uri: str, wait_s: float) -> None:
        self._client, self._uri, self._wait_s = client, uri, wait_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        outage = _OUTAGES.setdefault(self._uri, _Outage())

        def call(*args: Any, **kwargs: Any) -> Any:
            return outage.ride_out(self._uri, self._wait_s, attr, *args, **kwargs)

        return call


def prepare(settings: MlflowSettings) -> Tracker:
    """In the driver, before any worker starts: check the store, create the DB and experiment once."""
    uri = resolve_tracking_uri(settings)
    bound_http_waits()
    export_credentials(settings.username, settings.password)
    auth = None
    if settings.username and settings.password is not None:
        auth = (settings.username, settings.password.get_secret_value())
    check_reachable(uri, auth=auth)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    try:
        experiment = client.get_experiment_by_name(settings.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(settings.experiment)
        )
    except Exception as exc:  # MlflowException, DB and HTTP errors all end the same way for the user
        raise PipelineError(
            f"MLflow store {uri}: cannot open experiment {settings.experiment!r}: {exc}"
        ) from exc
    logger.info("MLflow store %s, experiment %r (id %s)", uri, settings.experiment, experiment_id)
    return Tracker(uri, experiment_id, settings.username, settings.password)


# --------------------------------------------------------------------------- the tracker

_CLIENTS: dict[str, MlflowClient] = {}


@dataclass(frozen=True)
class Tracker:
    """Handle on one experiment in one store; cheap to pickle into Ray workers."""

    tracking_uri: str
    experiment_id: str
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    # the driver's tracker waits this long for a server that stopped answering (0: fail at once)
    outage_wait_s: float = 0.0
    # where what could not be sent is journaled (pipeline.tracking_journal); None: a temp folder
    journal_dir: str | None = None

    @property
    def client(self) -> MlflowClient:
        export_credentials(self.username, self.password)  # a fresh worker process needs them too
        bound_http_waits()
        if self.tracking_uri not in _CLIENTS:
            _CLIENTS[self.tracking_uri] = MlflowClient(self.tracking_uri)
        client = _CLIENTS[self.tracking_uri]
        return _PatientClient(client, self.tracking_uri, self.outage_wait_s) if self.outage_wait_s else client

    def with_settings(self, **changes: Any) -> Tracker:
        return replace(self, **changes)

    # ----------------------------------------------------------------------- run lifecycle

    def start_job_run(
        self, job_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        """The parent run of one pipeline run; returns its run id."""
        run = self.client.create_run(
            self.experiment_id, run_name=job_name, tags={JOB_TAG: job_name, **(tags or {})}
        )
        run_id = run.info.run_id
        if params:
            self.log_params(run_id, params)
        logger.info("MLflow job run %s (%s)", run_id, job_name)
        return run_id

    def start_stage_run(
        self,
        parent_id: str,
        stage: str,
        fingerprint: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """A child run of `parent_id` for one stage, tagged with its fingerprint for caching."""
        parent = self.client.get_run(parent_id)
        job_name = parent.data.tags.get(JOB_TAG, "")
        run = self.client.create_run(
            self.experiment_id,
            run_name=stage,
            tags={
                MLFLOW_PARENT_RUN_ID: parent_id,
                STAGE_TAG: stage,
                JOB_TAG: job_name,
                lineage.FINGERPRINT: fingerprint,
                **(tags or {}),
            },
        )
        run_id = run.info.run_id
        if params:
            self.log_params(run_id, params)
        logger.info("MLflow stage run %s (%s, fingerprint %s)", run_id, stage, fingerprint[:12])
        return run_id

    def finish_run(self, run_id: str, status: RunEnd = "FINISHED", error: str | None = None) -> None:
        """End a run with the status that happened; a FAILED run carries its one-line error as a tag."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise PipelineError(f"finish_run: status must be FINISHED, FAILED or KILLED, got {status!r}")
        if error:
            self.set_tags(run_id, {ERROR_TAG: _fit(error.strip().splitlines()[-1] if error.strip() else error)})
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.from_string(status)))

    def reopen_run(self, run_id: str, resumes: int) -> None:
        """Continue an interrupted run under the same id (RUNNING again, resume count as a tag)."""
        self.client.update_run(run_id, status="RUNNING")
        self.set_tags(run_id, {RESUMES_TAG: str(resumes)})

    def interrupted_runs(self, query: str) -> list[Run]:
        """Runs matching `query` that never ended or were killed (a driver lost or stopped), newest first."""
        found = self.client.search_runs(
            [self.experiment_id], f"{query} and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=50)
        return [r for r in found if r.info.status in ("RUNNING", "KILLED") and SUPERSEDED_TAG not in r.data.tags]

    def metric_steps(self, run_id: str) -> dict[str, int]:
        """The highest step logged per metric key of a run (empty for a new run)."""
        keys = self.client.get_run(run_id).data.metrics.keys()
        return {key: max(m.step for m in self.client.get_metric_history(run_id, key)) for key in keys}

    def get_run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    # ----------------------------------------------------------------------- values

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params as strings, cut to MLflow's length limit (the client batches by 100)."""
        entries = [Param(str(k), _fit(str(v))) for k, v in params.items()]
        self.client.log_batch(run_id, params=entries)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0,
                    timestamp_ms: int | None = None) -> None:
        """One batched call for a dict of scalars (floats, ints, 0-d tensors) at one step; `timestamp_ms`:
        when the step happened (a journaled step sent later keeps its time), default now."""
        now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        entries = [Metric(str(k), _scalar(k, v), now, int(step)) for k, v in metrics.items()]
        if entries:
            self.client.log_batch(run_id, metrics=entries)

    def metric_history_steps(self, run_id: str, keys: list[str]) -> dict[str, set[int]]:
        """Every step a run already has, per key (for sending a journal exactly once)."""
        return {key: {m.step for m in self.client.get_metric_history(run_id, key)} for key in keys}

    # ----------------------------------------------------------------------- files

    def log_artifacts(
        self, run_id: str, local_path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> str:
        """Upload a file or a directory (local, or any fsspec URL); returns the uploaded artifact's URI."""
        with local_copy(local_path) as path:
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
                relative = artifact_path or ""
            elif path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_path)
                relative = f"{artifact_path}/{path.name}" if artifact_path else path.name
            else:
                raise PipelineError(f"log_artifacts: {local_path} does not exist")
        return self.artifact_uri(run_id, relative)

    def artifact_uri(self, run_id: str, relative: str = "") -> str:
        root = self.client.get_run(run_id).info.artifact_uri.rstrip("/")
        return f"{root}/{relative}" if relative else root

    def log_image(
        self, run_id: str, image: Image | str | os.PathLike[str], name: str, step: int | None = None
    ) -> None:
        """A PIL image (or an image file) as images/<name>.png; with `step`, a step series named `name`."""
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise PipelineError(f"log_image: {path} does not exist")
            if step is None:
                self.client.log_artifact(run_id, str(path), "images")
                return
            from PIL import Image as PILImage

            with PILImage.open(path) as opened:
                image = opened.convert("RGB")
        if step is not None:
            self.client.log_image(run_id, image, key=name, step=int(step))
        else:
            self.client.log_image(run_id, image, artifact_file=f"images/{name}.png")

    # ----------------------------------------------------------------------- lineage and caching

    def log_dataset(
        self, run_id: str, url: str, digest: str, context: str, name: str | None = None, primary: bool = True
    ) -> None:
        """Record a dataset manifest as a run input; `primary` also sets the lineage.dataset_* tags."""
        lineage.log_dataset(self.client, run_id, url, digest, context, name, primary)

    def set_upstream(self, run_id: str, upstream_run_id: str, artifact_uri: str) -> None:
        """Name the run and the artifact (e.g. the pretrain export) this stage consumed."""
        self.set_tags(
            run_id, {lineage.UPSTREAM_RUN_ID: upstream_run_id, lineage.UPSTREAM_ARTIFACT_URI: artifact_uri}
        )

    def find_finished_stage(self, stage: str, fingerprint: str) -> Run | None:
        """The newest FINISHED run of `stage` with this fingerprint, if any (stage caching)."""
        return lineage.find_finished_run(self.client, self.experiment_id, STAGE_TAG, stage, fingerprint)

    def lineage_chain(self, run_id: str) -> list[lineage.LineageLink]:
        """Follow lineage.upstream_run_id tags from `run_id` back to the first stage and its dataset."""
        return lineage.walk(self.client, run_id, STAGE_TAG)

    def register_classifier(
        self, run_id: str, export_dir: str | os.PathLike[str], name: str, description: str | None = None
    ) -> ModelVersion:
        """Log the export as a pyfunc model under the run and register it as a new version of `name`."""
        from pipeline.registry import register_classifier

        with local_copy(export_dir) as local:
            return register_classifier(self.client, run_id, local, name, description)


@contextmanager
def local_copy(path_or_url: str | os.PathLike[str]) -> Iterator[Path]:
    """A local path as is; a remote fsspec URL (s3://, memory://, ...) copied to a temporary folder.

    MLflow's artifact stores are not fsspec-based, so remote stage outputs are fetched before upload.
    """
    text = os.fspath(path_or_url)
    if "://" not in text or text.startswith("file://"):
        yield Path(text.removeprefix("file://"))
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(text)
    name = root.rstrip("/").rsplit("/", 1)[-1] or "artifact"
    with tempfile.TemporaryDirectory(prefix="mlflow-upload-") as tmp:
        target = Path(tmp) / name
        if fs.isfile(root):
            fs.get_file(root, str(target))
        elif fs.isdir(root):
            for remote in fs.find(root):
                local = target / remote[len(root.rstrip("/")) + 1 :]
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
        yield target


def _fit(text: str) -> str:
    return text if len(text) <= MLFLOW_MAX_PARAM_LENGTH else text[: MLFLOW_MAX_PARAM_LENGTH - 3] + "..."


def _scalar(key: Any, value: Any) -> float:
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise PipelineError(f"metric {key!r}: {value!r} is not a number") from None
