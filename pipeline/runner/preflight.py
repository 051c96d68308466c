"""Checks that run before any work: what a spec names must exist, and records must outlive the run.

`check_job(job, stages, tracker)` (first thing of `run_job`): each problem is named with its spec key
in one PipelineError, found in seconds instead of after shards, Ray and trainers (`plan_job` runs
the same checks in two parts, `check_settings` and `input_problems`, so that it can still print
the plan and then list every input it could not check):
- `model.variant` is a registered Spikformer variant (with "did you mean");
- the model builds with `model.*` for every selected stage (on the meta device: no memory, no init
  cost), so a wrong `model.kwargs` is a one-line error, not a traceback on every worker;
- the manifests the spec names (`data.train/val/pretrain`, not the ones `data.build` will write)
  exist and parse;
- `stages.finetune.init` / `stages.evaluate.export` name an export: a plain URL must hold one; a
  `runs:/`, `models:/` or `job:` reference is resolved when an MLflow tracker is at hand.

`check_output_root(job)` (`run` and `local`, before the log file is opened there): a local
output_root must be a folder that can be created; a file in its place is one line, not a traceback.

`check_records_location(job)` (the `run` driver, before anything else): a driver started by
`ray job submit --working-dir .` runs inside Ray's temporary copy of that folder
(`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`), which Ray deletes; a relative MLflow
store or output location would silently land there. `relative_locations` is shared with `submit`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence

from pipeline.config import JobConfig
from pipeline.data.fsutil import absolute_url, is_remote
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for every job driver
RAY_WORKING_DIR_PART = os.path.join("runtime_resources", "working_dir_files")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # what pipeline.tracking uses when nothing is set


# --------------------------------------------------------------------------- the spec


def check_job(job: JobConfig, stages: Sequence[str], tracker=None) -> None:
    check_settings(job, stages)
    problems = input_problems(job, stages, tracker)
    if problems:
        raise PipelineError("; ".join(problems))


def check_settings(job: JobConfig, stages: Sequence[str]) -> None:
    """What the spec alone decides: the variant and each selected stage's model."""
    check_variant(job)
    for name in stages:
        check_model(job, name)


def input_problems(job: JobConfig, stages: Sequence[str], tracker=None, require_store: bool = False) -> list[str]:
    """One line per input the spec names that cannot be read: every manifest and every upstream export
    (each checked even when another failed). A runs:/, models:/ or job: reference is resolved with
    `tracker`; without one it is left to the stage's resolution, or (require_store, plan) listed as
    not checkable."""
    from pipeline.data.manifest import load_manifest

    problems = []
    for key, url in named_manifests(job, stages).items():
        try:
            load_manifest(url)
        except PipelineError as err:
            problems.append(f"{key}: {err}")
    for name in stages:
        try:
            check_upstream_export(job, name, tracker, require_store)
        except PipelineError as err:
            problems.append(str(err))
    return problems


def check_variant(job: JobConfig) -> None:
    import models

    variant, known = job.model.variant, models.list_models()
    if variant in known:
        return
    close = difflib.get_close_matches(variant, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; registered variants: {', '.join(known)}"
    raise PipelineError(f"model.variant: {variant!r} is not a registered Spikformer variant{hint}")


def check_model(job: JobConfig, stage: str) -> None:
    """Build the stage's model on the meta device: the constructor checks every argument."""
    import torch

    from pipeline.stages.table import STAGES

    try:
        with torch.device("meta"):
            STAGES[stage].build_model(job)
    except PipelineError:
        raise
    except Exception as err:  # noqa: BLE001 - TypeError, ValueError, torch's RuntimeError: a bad setting
        key = "model.kwargs" if job.model.kwargs else "model"
        given = f" with {job.model.kwargs}" if job.model.kwargs else ""
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"{key}: {job.model.variant}{given} (stage {stage}): {detail}") from None


def named_manifests(job: JobConfig, stages: Sequence[str]) -> dict[str, str]:
    """{spec key: manifest URL} the selected stages read and the spec names itself."""
    from pipeline.stages.table import STAGES

    data = job.data
    key_of_role = {"train": "data.train", "eval": "data.val",
                   "pretrain": "data.pretrain" if data.pretrain else "data.train"}
    named = {}
    for name in stages:
        for role in STAGES[name].roles(job):
            key = key_of_role.get(role)
            if key is None:  # a role the spec cannot name itself
                continue
            url = getattr(data, key.split(".")[1])
            if url and not _written_by_build(job, url):
                named[key] = url
    return named


def _written_by_build(job: JobConfig, url: str) -> bool:
    """A manifest the job's own data.build writes (under its dest, or under output_root by default)."""
    build = job.data.build
    if build is None:
        return False
    names = {f"{split}.manifest.json" for split in build.splits}
    root = absolute_url(build.dest or job.output_root).rstrip("/") + "/"
    return absolute_url(url).startswith(root) and absolute_url(url).rsplit("/", 1)[-1] in names


def check_upstream_export(job: JobConfig, stage: str, tracker, require_store: bool = False) -> None:
    """The export a stage's spec key names (not the one this job's upstream stage will write)."""
    from pipeline.references import is_reference, resolve_export
    from pipeline.stages.table import STAGES
    from pipeline.train.export import read_export_config

    spec = STAGES[stage]
    if not spec.needs_upstream(job):
        return
    reference = spec.upstream_reference(job)
    if not reference:
        return
    if is_reference(reference):
        if tracker is None and not require_store:
            return  # resolved (or reported) with the MLflow store by the stage's own resolution
        url = resolve_export(reference, spec.upstream_key, spec.upstream, tracker, absolute_url(job.output_root)).url
    else:
        url = reference
    try:
        if url.endswith(".safetensors"):
            _must_exist(url)
        else:
            read_export_config(url)
    except PipelineError as err:
        raise PipelineError(f"{spec.upstream_key}: {reference}: {err}") from None


def _must_exist(url: str) -> None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        found = fs.exists(path)
    except Exception as err:  # noqa: BLE001 - any unreadable location is one line
        raise PipelineError(f"{url}: cannot read: {type(err).__name__}: {err}") from None
    if not found:
        raise PipelineError(f"{url} not found")


def check_output_root(job: JobConfig) -> None:
    """A local output_root is created now (it holds the log file); a file in its way is one line."""
    if is_remote(job.output_root):
        return
    path = absolute_url(job.output_root)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:  # FileExistsError (a file there), NotADirectoryError (a file above), EACCES
        problem = "is a file, not a folder" if os.path.isfile(path) else f"cannot create it: {err.strerror}"
        raise PipelineError(f"output_root: {job.output_root}: {problem}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PipelineError(f"output_root: {job.output_root}: the folder is not writable")


# --------------------------------------------------------------------------- where records go


def effective_tracking_uri(job: JobConfig, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return job.mlflow.tracking_uri or env.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _relative_path(location: str) -> bool:
    location = location.removeprefix("file://")
    return "://" not in location and not os.path.isabs(location)


def _relative_tracking_uri(uri: str) -> bool:
    if uri.startswith("sqlite:///"):
        return not uri[len("sqlite:///"):].startswith("/")
    if uri.startswith("file:"):
        return not uri[len("file:"):].startswith("/")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", uri):
        return False  # a server or database (http://, postgresql://, databricks)
    return not os.path.isabs(uri)  # a bare folder is an MLflow file store


def relative_locations(job: JobConfig, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """{spec key: value} of the places records go that are relative to the working directory."""
    found = {}
    uri = effective_tracking_uri(job, env)
    if _relative_tracking_uri(uri):
        found["mlflow.tracking_uri"] = uri
    if _relative_path(job.output_root):
        found["output_root"] = job.output_root
    if job.data.build is not None and job.data.build.dest and _relative_path(job.data.build.dest):
        found["data.build.dest"] = job.data.build.dest
    return found


def absolute_overrides(relative: Mapping[str, str], base: str) -> dict[str, str]:
    """The same locations, resolved against `base` (the submitting folder)."""
    fixed = {}
    for key, value in relative.items():
        if key == "mlflow.tracking_uri":
            path = value[len("sqlite:///"):] if value.startswith("sqlite:///") else value.removeprefix("file:")
            absolute = os.path.normpath(os.path.join(base, path))
            fixed[key] = f"sqlite:///{absolute}" if value.startswith("sqlite:///") else absolute
        else:
            fixed[key] = os.path.normpath(os.path.join(base, value.removeprefix("file://")))
    return fixed


def ray_job_working_dir(cwd: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The folder when this process is a Ray job's driver in its uploaded working directory, else None."""
    env = os.environ if env is None else env
    cwd = cwd or os.getcwd()
    if RAY_WORKING_DIR_PART in cwd:
        return cwd
    raw = env.get(RAY_JOB_ENV)
    if raw:
        try:
            runtime_env = json.loads(raw).get("runtime_env") or {}
        except (ValueError, AttributeError):
            runtime_env = {}
        if runtime_env.get("working_dir"):
            return cwd
    return None


def check_records_location(job: JobConfig, cwd: str | None = None, env: Mapping[str, str] | None = None) -> None:
    folder = ray_job_working_dir(cwd, env)
    if folder is None:
        return
    relative = relative_locations(job, env)
    if not relative:
        return
    named = ", ".join(f"{key}={value}" for key, value in relative.items())
    sets = " ".join(f"--set {key}=<absolute path or URL>" for key in relative)
    raise PipelineError(
        f"this driver runs in Ray's temporary copy of the working directory ({folder}), which Ray deletes, "
        f"and {named} would be written inside it: give {sets} (a shared folder, s3://..., or an MLflow "
        f"server http://...), or submit with `python -m pipeline submit`, which does so for a head on this machine")
