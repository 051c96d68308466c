"""Register a finetuned classifier export in the MLflow model registry, linked to its run.

The model is an `mlflow.pyfunc` model from code (pipeline/pyfunc_classifier.py, no pickle) with
the export directory as its artifact and the `models` package bundled, so any machine with torch
and timm can `mlflow.pyfunc.load_model("models:/<name>/<version>")`. Requirements are given
explicitly: MLflow's requirement inference would load the model and take many seconds.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from pipeline.errors import PipelineError
from pipeline.train.export import EXPORT_FORMAT

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("pyfunc_classifier.py")
MODEL_ARTIFACT_PATH = "model"
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
)


def register_classifier(
    client: MlflowClient, run_id: str, export_dir: Path, name: str, description: str | None = None
) -> ModelVersion:
    """Save the pyfunc model, upload it under the run's artifacts and create a registry version."""
    config = _check_export(export_dir)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / MODEL_ARTIFACT_PATH
        with warnings.catch_warnings():  # nags about type hints / input examples: the signature is explicit
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(MODEL_CODE),
                artifacts={"export": str(export_dir)},
                code_paths=_bundled_packages(),
                pip_requirements=_requirements(),
                signature=SIGNATURE,
            )
        client.log_artifacts(run_id, str(local), MODEL_ARTIFACT_PATH)
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + MODEL_ARTIFACT_PATH
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="Spikformer V2 classifiers finetuned by the pipeline"
        )
    version = client.create_model_version(
        name,
        source,
        run_id=run_id,
        tags={
            "source_run_id": run_id,
            "variant": config["variant"],
            "weights_sha256": str(config.get("weights_sha256", "")),
        },
        description=description or f"{config['variant']} finetuned in MLflow run {run_id}",
    )
    logger.info("registered %s version %s from run %s", name, version.version, run_id)
    return version


def _check_export(export_dir: Path) -> dict:
    config_path = export_dir / "config.json"
    if not (export_dir / "model.safetensors").is_file() or not config_path.is_file():
        raise PipelineError(f"{export_dir}: not an export (needs model.safetensors and config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{config_path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT or "variant" not in config:
        raise PipelineError(f"{config_path}: expected format {EXPORT_FORMAT!r} with a 'variant'")
    return config


def _bundled_packages() -> list[str]:
    """The `models` package travels with the registered model (it defines the Spikformer variants)."""
    try:
        import models
    except ImportError:
        return []
    return [str(Path(models.__file__).parent)]


def _requirements() -> list[str]:
    wanted = ["mlflow", "torch", "timm", "safetensors", "numpy"]
    pins = []
    for package in wanted:
        try:
            version = metadata.version(package).split("+")[0]  # drop local tags like +cpu
        except metadata.PackageNotFoundError:
            pins.append(package)
            continue
        pins.append(f"{package}=={version}")
    return pins
