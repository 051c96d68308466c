"""MLflow "model from code" for a registered classifier: rebuilds the network from an export.

MLflow stores this file beside the model instead of a pickle, so loading a registered version
needs only torch, timm, safetensors and the `models` package (bundled with the model). It must
not import `pipeline`. The export directory is the model's artifact "export":
`config.json` {"format": "spikformer-export/1", "variant", "kwargs"} + `model.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np


class ExportedClassifier(mlflow.pyfunc.PythonModel):
    """predict: float32 images [N, 3, H, W], normalised as in evaluation -> logits [N, classes]."""

    def load_context(self, context: Any) -> None:
        import timm
        import torch
        from safetensors.torch import load_file

        import models  # noqa: F401  (bundled with the model: registers the variants, names the format)
        from models.export_format import EXPORT_FORMAT
        export = Path(context.artifacts["export"])
        config = json.loads((export / "config.json").read_text())
        if config.get("format") != EXPORT_FORMAT:
            raise ValueError(
                f"{export}/config.json: format {config.get('format')!r}, expected {EXPORT_FORMAT!r}"
            )
        model = timm.create_model(config["variant"], **config.get("kwargs", {}))
        model.load_state_dict(load_file(str(export / "model.safetensors")))
        self.model = model.eval()
        self.torch = torch

    # No type hints here: MLflow would try to derive an input schema from them.
    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):  # a named-tensor request from a serving endpoint
            model_input = next(iter(model_input.values()))
        images = self.torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with self.torch.inference_mode():
            return self.model(images).float().numpy()


mlflow.models.set_model(ExportedClassifier())
