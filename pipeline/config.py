"""The typed job spec: everything a user edits lives in one YAML validated into these classes.

Each block is a strict pydantic model (unknown keys are errors). Recipe defaults follow
MAE/SparK-style SSL and MAE/BEiT-style finetuning (docs/REPRODUCE.md names the sources); jobs/*.yaml override them.
Loading (YAML, ${ENV} interpolation, --set overrides, error wording) lives further down.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator

from pipeline.errors import PipelineError
from pipeline.redact import MASK, SECRET_KEY_PATTERN, redact_url
from pipeline.schema import Settings

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- data


class ShardBuildSettings(Settings):
    """Optional first step: build shards from a source before training (digits, shapes, imagefolder, imagenet)."""

    source: str = "digits"
    root: str | None = Field(None, description="source folder for imagefolder/imagenet")
    dest: str | None = Field(None, description="fsspec URL of the shard folder; default {output_root}/shards")
    splits: list[str] = ["train", "val"]
    shard_max_count: int | None = 1000
    shard_max_mb: float | None = None
    options: dict[str, Any] = {}


class DataSettings(Settings):
    build: ShardBuildSettings | None = None
    train: str | None = Field(None, description="manifest URL of the labelled training split")
    val: str | None = Field(None, description="manifest URL of the validation split")
    pretrain: str | None = Field(None, description="manifest URL for SSL pretraining; default: train")
    loader_workers: int = Field(2, ge=0, description="DataLoader worker processes per training process")
    on_error: Literal["raise", "skip"] = "raise"
    decode: Literal["cpu", "gpu", "auto"] = Field(
        "cpu", description="where images are decoded and cropped: cpu (DataLoader workers), gpu (nvJPEG on the "
        "training GPU; roles without PIL-only augmentations), auto (gpu where possible)")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "num_workers" in data:
            raise ValueError("data.num_workers was renamed data.loader_workers (DataLoader processes per "
                             "training process; scaling.num_workers is the number of training workers)")
        return data

    @model_validator(mode="after")
    def _need_a_source(self) -> DataSettings:
        if self.build is None and self.train is None and self.val is None and self.pretrain is None:
            raise ValueError("give data.build (to make shards) or at least one manifest URL (data.train/val)")
        return self


# --------------------------------------------------------------------------- model


class ModelSettings(Settings):
    variant: str = "spikformer_v2_tiny"
    img_size: int = Field(32, gt=0)
    num_classes: int = Field(10, gt=0)
    kwargs: dict[str, Any] = Field({}, description="extra keyword arguments for timm.create_model")


# --------------------------------------------------------------------------- training engine


class OptimizerSettings(Settings):
    """AdamW; lr = base_lr * global_batch / 256 unless `lr` is given."""

    base_lr: float = Field(1.5e-4, gt=0)
    lr: float | None = Field(None, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    layer_decay: float | None = Field(None, gt=0, le=1)


class DeepSpeedSettings(Settings):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    grad_clip: float | None = Field(None, gt=0)
    config_overrides: dict[str, Any] = Field({}, description="merged last into the DeepSpeed config dict")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the module inside the DeepSpeed engine (every training stage); auto: "
        "on for CUDA runs (1.3-1.9x the eager step on an H200, issue 20), off on CPU")


class CheckpointSettings(Settings):
    every_steps: int = Field(200, gt=0)
    every_minutes: float | None = Field(
        None, gt=0, description="also checkpoint when this long passed since the last one (checked at log steps)"
    )
    keep_last: int = Field(2, ge=1, description="checkpoints kept, in every rank's folder and in Ray's storage")


class LoopSettings(Settings):
    """What every training stage shares: length, batch, accumulation, logging cadence."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(64, gt=0, description="micro-batch per worker")
    grad_accum_steps: int = Field(1, ge=1)
    T: int = Field(1, ge=1, description="time steps")
    log_every_steps: int = Field(10, gt=0)
    firing_rate_every_steps: int = Field(100, gt=0)
    checkpoint: CheckpointSettings = CheckpointSettings()


class AugmentSettings(Settings):
    """timm create_transform options for the training stream."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0, le=1)
    auto_augment: str | None = None
    re_prob: float = Field(0.0, ge=0, le=1)
    color_jitter: float | None = None
    interpolation: str = "bicubic"
    crop_pct: float = Field(1.0, gt=0, le=1, description="eval: resize to img/crop_pct, centre crop")


# --------------------------------------------------------------------------- stages


class PretrainSettings(LoopSettings):
    enabled: bool = True
    mask_ratio: float = Field(0.6, gt=0, lt=1)
    patch_size: int | None = Field(None, gt=0, description="mask granularity in pixels; default: stem stride")
    decoder_dim: int = Field(256, gt=0)
    decoder_depth: int = Field(4, ge=1)
    decoder_heads: int = Field(4, ge=1)
    norm_pix_loss: bool = True
    optimizer: OptimizerSettings = OptimizerSettings()
    augment: AugmentSettings = AugmentSettings(scale=(0.2, 1.0))
    reconstruction_every_steps: int = Field(200, gt=0)
    # SSL health (pipeline.stages.knn): weighted kNN top-1 of the frozen encoder's pooled features
    knn_every_steps: int | None = Field(
        None, gt=0, description="run the kNN monitor every N steps, at step 0 and at the end; None: off (then "
        "pretrain reads only its pretrain data; on, it also reads data.train (bank) and data.val)")
    knn_bank_size: int = Field(10000, gt=0, description="labelled train samples in the kNN memory bank")
    knn_eval_size: int = Field(5000, gt=0, description="val samples the kNN monitor classifies")
    knn_k: int = Field(20, gt=0, description="neighbours per query")
    knn_temperature: float = Field(0.07, gt=0, description="neighbour votes are weighted exp(similarity / T)")
    knn_batch_size: int | None = Field(None, gt=0, description="embedding batch per rank; default: batch_size")
    knn_bn_stats: Literal["bank", "running"] = Field(
        "bank", description="BatchNorm statistics the monitor's encoder uses: 'bank' re-estimates them on the bank "
        "images at every evaluation (precise BN: running statistics lag the weights by ~1/momentum steps and start "
        "at mean 0 / var 1, under which an untrained Spikformer is silent in eval mode); 'running': the running "
        "statistics, as the export holds them")


class EmaSettings(Settings):
    enabled: bool = False
    decay: float = Field(0.9999, gt=0, lt=1)


class FinetuneSettings(LoopSettings):
    enabled: bool = True
    init: Literal["pretrain", "scratch"] | str = Field(
        "pretrain",
        description="'pretrain' (this job's pretrain export), 'scratch', an export folder or .safetensors URL, "
        "runs:/<run_id>/export, models:/<name>/<version>, models:/<name>@<alias>, or job:<job name>",
    )
    label_fraction: float = Field(1.0, gt=0, le=1, description="use this fraction of train labels")
    drop_path: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    optimizer: OptimizerSettings = OptimizerSettings(base_lr=6e-4, betas=(0.9, 0.999), layer_decay=0.75)
    augment: AugmentSettings = AugmentSettings(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    ema: EmaSettings = EmaSettings()


class EvaluateSettings(Settings):
    enabled: bool = True
    T: int | None = Field(None, ge=1, description="default: the finetune T")
    batch_size: int = Field(128, gt=0)
    split: Literal["val", "train"] = "val"
    energy_batches: int = Field(4, ge=1, description="batches used for firing rates / energy")
    export: str | None = Field(
        None,
        description="classifier to evaluate: an export folder URL, runs:/<run_id>/export, models:/<name>/<version>, "
        "models:/<name>@<alias> or job:<job name>; default: this job's finetune export",
    )


class ProbeSettings(LoopSettings):
    """Linear probe (MAE's): frozen encoder, BatchNorm1d without affine + Linear on its pooled features."""

    enabled: bool = False
    init: Literal["pretrain"] | str = Field(
        "pretrain",
        description="the encoder to probe: 'pretrain' (this job's pretrain export), an export folder URL, "
        "runs:/<run_id>/export, models:/<name>/<version>, models:/<name>@<alias>, or job:<job name>",
    )
    epochs: float = Field(10.0, gt=0)
    batch_size: int = Field(256, gt=0, description="micro-batch per worker")
    # torch AdamW through the engine (MAE uses LARS, base lr 0.1); no weight decay, as MAE's probe
    optimizer: OptimizerSettings = OptimizerSettings(base_lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999))
    # MAE's probe augmentation: RandomResizedCrop + flip, nothing else
    augment: AugmentSettings = AugmentSettings()
    eval_batch_size: int = Field(256, gt=0, description="batch per worker for the top-1/top-5 pass over val")


class StagesSettings(Settings):
    pretrain: PretrainSettings = PretrainSettings()
    probe: ProbeSettings = ProbeSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    evaluate: EvaluateSettings = EvaluateSettings()


# --------------------------------------------------------------------------- orchestration


class ScalingSettings(Settings):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    max_failures: int = Field(1, ge=-1)


class MlflowSettings(Settings):
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = "spikformer-v2"
    registered_model: str = "spikformer-v2"
    username: str | None = None
    password: SecretStr | None = None


class RaySettings(Settings):
    address: str | None = Field(None, description="default: RAY_ADDRESS, else a local Ray")
    working_dir: str = "."
    runtime_env: dict[str, Any] = {}


class SweepCell(Settings):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    set: dict[str, Any] = Field({}, description="dotted key -> value, as --set would give them")
    seeds: int | list[int] | None = Field(None, description="this cell's seeds; default: sweep.seeds")


class SweepSettings(Settings):
    """A job run per cell and seed, under one parent MLflow run (pipeline/runner/sweep.py)."""

    cells: list[SweepCell] = []
    grid: dict[str, dict[str, dict[str, Any]]] = Field(
        {}, description="axis -> level name -> overrides; every combination is a cell named 'level-level'"
    )
    seeds: int | list[int] = Field(1, description="a count (seed, seed+1, ...) or the seeds themselves")
    max_concurrent: int = Field(1, ge=1, description="cells at once, as far as the Ray cluster has CPUs for them")

    @model_validator(mode="after")
    def _some_cell(self) -> SweepSettings:
        if not self.cells and not self.grid:
            raise ValueError("give sweep.cells or sweep.grid")
        if isinstance(self.seeds, int) and self.seeds < 1:
            raise ValueError("sweep.seeds must be >= 1 (or a list of seeds)")
        return self


class JobConfig(Settings):
    name: str
    output_root: str = Field("outputs", description="fsspec URL where stage outputs go")
    seed: int = 0
    data: DataSettings
    model: ModelSettings = ModelSettings()
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    stages: StagesSettings = StagesSettings()
    scaling: ScalingSettings = ScalingSettings()
    mlflow: MlflowSettings = MlflowSettings()
    ray: RaySettings = RaySettings()
    sweep: SweepSettings | None = None


def with_overrides(job: JobConfig, overrides: Mapping[str, Any], label: str) -> JobConfig:
    """The job with dotted-key overrides applied (checked as --set checks them), validated again."""
    raw = job.model_dump(mode="python")  # keeps secrets as SecretStr (a JSON dump would mask them)
    for key, value in overrides.items():
        try:
            _apply_override(raw, f"{key}={json.dumps(value)}", label)
        except PipelineError as err:
            raise PipelineError(f"{label}: {str(err).removeprefix('--set ')}") from None
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError("\n".join(f"{label}: {line}" for line in _describe_errors(exc))) from None


# =========================================================================== loading
# YAML file -> --set overrides -> ${ENV} interpolation -> pydantic validation. Every problem
# becomes one PipelineError line "<file>: <key.path>: <what is wrong>" so users can fix it
# without reading a traceback.

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_SECRET_KEY_PATTERN = SECRET_KEY_PATTERN  # pipeline.redact decides what is secret, for every place
_MASK = MASK
# mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (checked by a test); kept here so loading a job
# does not import mlflow.
MLFLOW_MAX_PARAM_LENGTH = 6000


def load_job(path_or_url: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobConfig:
    """Read, override, interpolate and validate one job spec; raise PipelineError on any problem."""
    label = str(path_or_url)
    raw = _read_composed(label, ())
    for override in overrides:
        _apply_override(raw, override, label)
    raw = _interpolate_env(raw, label, ())
    try:
        job = JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError("\n".join(f"{label}: {line}" for line in _describe_errors(exc))) from None
    logger.info("loaded job %r from %s (%d override(s))", job.name, label, len(overrides))
    return job


def resolved_dict(job: BaseModel) -> dict[str, Any]:
    """The fully resolved spec (or any settings block) as plain JSON types, secrets masked (URL
    passwords too): for hashing."""
    return _jsonable(job.model_dump(mode="python"))


def flatten_params(job: BaseModel, prefix: str = "") -> dict[str, str]:
    """Dotted-key -> string view of the spec (or one block, keys under `prefix`) for MLflow params.

    Secrets (secret-like keys, SecretStr, URL passwords) are masked and long values truncated to
    MLflow's limit.
    """
    flat: dict[str, str] = {}
    _flatten_into(flat, prefix, job.model_dump(mode="python"))
    return flat


# --------------------------------------------------------------------------- reading


def _read_yaml_mapping(label: str) -> dict[str, Any]:
    try:
        if "://" in label:
            import fsspec

            with fsspec.open(label, "r", encoding="utf-8") as fh:
                text = fh.read()
        else:
            text = Path(label).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{label}: job spec not found") from None
    except IsADirectoryError:
        raise PipelineError(f"{label}: is a directory, expected a YAML job spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{label}: cannot read job spec: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PipelineError(f"{label}: not valid YAML{where}: {problem}") from None
    if raw is None:
        raise PipelineError(f"{label}: is empty, expected a mapping of job settings")
    if not isinstance(raw, dict):
        raise PipelineError(f"{label}: top level must be a mapping of job settings, got {type(raw).__name__}")
    return raw


# --------------------------------------------------------------------------- composition (base:)


def _read_composed(label: str, chain: tuple[str, ...]) -> dict[str, Any]:
    """A spec with `base: other.yaml` (or a list of them, merged in order; paths relative to the spec)
    is its bases deep-merged, then its own keys on top."""
    raw = _read_yaml_mapping(label)
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b.strip() for b in bases):
        raise PipelineError(f"{label}: base: expected the path of another job spec (or a list), got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_label = _relative_to(label, base)
        if _same_file(base_label, (*chain, label)):
            cycle = " -> ".join([*chain, label, base_label])
            raise PipelineError(f"{label}: base: composition cycle {cycle}")
        merged = deep_merge(merged, _read_composed(base_label, (*chain, label)))
    return deep_merge(merged, raw)


def _relative_to(label: str, path: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    if "://" in label:
        return label.rsplit("/", 1)[0] + "/" + path
    return os.path.normpath(os.path.join(os.path.dirname(label), path))


def _same_file(label: str, others: Iterable[str]) -> bool:
    key = label if "://" in label else os.path.realpath(label)
    return any(key == (o if "://" in o else os.path.realpath(o)) for o in others)


def deep_merge(base: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value (lists included) in `own` replaces the base's.
    (Job composition, and the engine's deepspeed.config_overrides.)"""
    merged = dict(base)
    for key, value in own.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------- ${ENV} interpolation


def _interpolate_env(value: Any, label: str, path: tuple[Any, ...]) -> Any:
    if isinstance(value, dict):
        return {key: _interpolate_env(item, label, (*path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate_env(item, label, (*path, i)) for i, item in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise PipelineError(
            f"{label}: {_dotted(path)}: environment variable {name} is not set "
            f"(export it, or write ${{{name}:-default}})"
        )

    return _ENV_PATTERN.sub(substitute, value)


# --------------------------------------------------------------------------- --set overrides


def _apply_override(raw: dict[str, Any], override: str, label: str) -> None:
    key_path, sep, text = override.partition("=")
    keys = key_path.strip().split(".")
    if not sep or not all(keys):
        raise PipelineError(f"--set {override!r}: expected key.path=value, e.g. stages.finetune.epochs=3")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise PipelineError(f"--set {key_path}: value {text!r} is not a YAML value: {exc}") from None

    model: type[BaseModel] | None = JobConfig
    node = raw
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        if model is not None:  # typed level: the key must be a field
            fields = model.model_fields
            if key not in fields:
                raise PipelineError(f"--set {key_path}: unknown key '{here}'{_suggest(key, fields)}")
            next_model = _model_of(fields[key].annotation)
            is_mapping = next_model is not None or _is_free_mapping(fields[key].annotation)
        else:  # free-form dict (model.kwargs, deepspeed.config_overrides, ...): any key
            next_model, is_mapping = None, True
        if depth == len(keys) - 1:
            node[key] = value
            return
        if not is_mapping:
            raise PipelineError(f"--set {key_path}: '{here}' is a value, not a section with sub-keys")
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node, model = child, next_model


# --------------------------------------------------------------------------- error wording


def _describe_errors(exc: ValidationError) -> list[str]:
    """One line per key; a union field's alternatives ("'pretrain' or 'scratch'", "a string") share one."""
    problems: dict[str, tuple[list[str], str]] = {}
    for err in exc.errors():
        where, message, got = _describe_error(err)
        messages, _ = problems.setdefault(where, ([], got))
        messages.append(message)
    return [f"{where}: {', or '.join(messages)}{got}" for where, (messages, got) in problems.items()]


def _describe_error(err: Mapping[str, Any]) -> tuple[str, str, str]:
    """(key path, message, " (got value)" or "") for one pydantic error."""
    loc = tuple(err["loc"])
    kind = err["type"]
    where = _dotted(loc) or "(top level)"
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        fields = parent.model_fields if parent is not None else {}
        return where, f"unknown key{_suggest(str(loc[-1]), fields)}", ""
    if kind == "missing":
        return where, "required key is missing", ""
    message = str(err["msg"]).removeprefix("Value error, ")
    if kind.startswith("value_error") or kind == "assertion_error":
        return where, message, ""
    shown = _MASK if _is_secret_location(loc) else _short_repr(err.get("input"))
    return where, message, f" (got {shown})"


def _suggest(key: str, allowed: Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def _dotted(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc if not _is_union_tag(part))


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member it tried into loc, e.g. "literal['pretrain','scratch']" or "str"
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none"} or "[" in part)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = redact_url(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_at(loc: Iterable[Any]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobConfig
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int) or _is_union_tag(part) or part not in model.model_fields:
            continue
        model = _model_of(model.model_fields[part].annotation)
    return model


def _is_secret_location(loc: tuple[Any, ...]) -> bool:
    parent = _model_at(loc[:-1])
    name = str(loc[-1]) if loc else ""
    if parent is not None and name in parent.model_fields:
        if _contains_type(parent.model_fields[name].annotation, SecretStr):
            return True
    return bool(_SECRET_KEY_PATTERN.search(name))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings class inside an annotation such as `ShardBuildSettings | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _is_free_mapping(annotation: Any) -> bool:
    if annotation is dict or get_origin(annotation) is dict:
        return True
    return any(_is_free_mapping(arg) for arg in get_args(annotation))  # e.g. dict[str, Any] | None


def _contains_type(annotation: Any, wanted: type) -> bool:
    return annotation is wanted or any(_contains_type(arg, wanted) for arg in get_args(annotation))


# --------------------------------------------------------------------------- MLflow params


def _flatten_into(flat: dict[str, str], prefix: str, value: Any) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if _SECRET_KEY_PATTERN.search(str(key)) and item is not None and not isinstance(item, dict):
                flat[name] = _MASK
            else:
                _flatten_into(flat, name, item)
        return
    if isinstance(value, SecretStr):
        text = _MASK
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(_jsonable(value))
    else:
        text = redact_url(str(value))  # a tracking URI or endpoint with user:password@
    if len(text) > MLFLOW_MAX_PARAM_LENGTH:
        text = text[: MLFLOW_MAX_PARAM_LENGTH - 3] + "..."
    flat[prefix] = text


def _jsonable(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return _MASK
    if isinstance(value, dict):
        return {
            str(k): _MASK if _SECRET_KEY_PATTERN.search(str(k)) and isinstance(v, str) else _jsonable(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return str(value)
