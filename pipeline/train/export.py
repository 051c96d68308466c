"""The hand-off between stages: a consolidated fp32 state_dict plus the config to rebuild the model.

An export is a directory (local path or any fsspec URL: file://, s3://, gs://, memory://) with
- `model.safetensors`: the state_dict (parameters and buffers, names as in the model), floats in fp32;
- `config.json`: {"format": "spikformer-export/1", "variant": <timm name>, "kwargs": {create_model
  kwargs}, "weights_sha256": <digest of model.safetensors>, ...any extra fields the caller passed}.

Writes are atomic per file (temporary name, then rename) and `config.json` goes last, so a reader
never takes a half-written export for a finished one; a torn re-export (new weights, old config)
is caught by the recorded `weights_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from models.export_format import EXPORT_FORMAT
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _fp32_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floats to fp32, everything to contiguous CPU tensors with their own storage (safetensors
    refuses tensors that share memory)."""
    out = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise PipelineError(f"export: state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[name] = t.contiguous().clone()
    return out


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_export(state_dict: dict[str, torch.Tensor], config: dict[str, Any], url: str) -> str:
    """Write an export to `url` (a directory) and return the sha256 of its weights file.

    `config` needs "variant" (str) and "kwargs" (dict); other JSON-serialisable fields are kept.
    """
    if not isinstance(config.get("variant"), str) or not isinstance(config.get("kwargs"), dict):
        raise PipelineError(
            f"export to {url}: config needs 'variant' (a timm model name) and 'kwargs' (a dict); "
            f"got keys {sorted(config)}"
        )
    if config.get("format", EXPORT_FORMAT) != EXPORT_FORMAT:
        raise PipelineError(f"export to {url}: config format {config['format']!r} is not {EXPORT_FORMAT!r}")
    weights = save_safetensors(_fp32_cpu(state_dict))
    digest = hashlib.sha256(weights).hexdigest()
    full_config = {"format": EXPORT_FORMAT, **config, "weights_sha256": digest}
    try:
        config_bytes = json.dumps(full_config, indent=2, sort_keys=True).encode()
    except TypeError as err:
        raise PipelineError(f"export to {url}: config is not JSON-serialisable ({err})") from err

    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    _write_atomic(fs, _join(root, WEIGHTS_FILE), weights)
    _write_atomic(fs, _join(root, CONFIG_FILE), config_bytes)
    logger.info(
        "wrote export %s (%d tensors, %.1f MB, sha256 %s)",
        url,
        len(state_dict),
        len(weights) / 1e6,
        digest[:12],
    )
    return digest


def read_export_config(url: str) -> dict[str, Any]:
    """The config.json of an export, checked for the expected format."""
    fs, root = fsspec.core.url_to_fs(url)
    path = _join(root, CONFIG_FILE)
    if not fs.exists(path):
        raise PipelineError(f"{_join(url, CONFIG_FILE)} not found: {url} is not a finished export")
    try:
        with fs.open(path, "rb") as f:
            config = json.loads(f.read())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{_join(url, CONFIG_FILE)} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise PipelineError(f"{_join(url, CONFIG_FILE)}: format is {found!r}, expected {EXPORT_FORMAT!r}")
    return config


def _read_weights(url: str) -> bytes:
    fs, root = fsspec.core.url_to_fs(url)
    path = _join(root, WEIGHTS_FILE)
    if not fs.exists(path):
        raise PipelineError(f"{_join(url, WEIGHTS_FILE)} not found")
    with fs.open(path, "rb") as f:
        return f.read()


def read_export(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load an export: (state_dict on CPU, config). Checks the weights against the recorded digest."""
    config = read_export_config(url)
    weights = _read_weights(url)
    digest = hashlib.sha256(weights).hexdigest()
    recorded = config.get("weights_sha256")
    if recorded is not None and recorded != digest:
        raise PipelineError(
            f"{_join(url, WEIGHTS_FILE)} has sha256 {digest[:12]}..., but {CONFIG_FILE} records "
            f"{recorded[:12]}...: the export is torn (interrupted re-export?); export it again"
        )
    return load_safetensors(weights), config


def export_digest(url: str) -> str:
    """sha256 of the export's weights file (or of a bare .safetensors file): identifies the model."""
    fs, root = fsspec.core.url_to_fs(url)
    path = root if root.endswith(".safetensors") else _join(root, WEIGHTS_FILE)
    if not fs.exists(path):
        raise PipelineError(f"{_join(url, WEIGHTS_FILE)} not found")
    sha = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()

