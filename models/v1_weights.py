"""Load checkpoints of the official Spikformer V1 ImageNet code (ZK-Zhou/spikformer, imagenet/).

That code trains with timm's train.py, whose CheckpointSaver writes
``{"epoch", "arch", "state_dict", "optimizer", "version", "args", "metric"[, "state_dict_ema"]}``;
a bare state_dict is accepted too. Keys carry a ``module.`` prefix when saved from a DDP wrapper.
Our module names equal the official ones, so the mapping is: strip the prefix, drop the unused
``block.<i>.norm1/norm2`` LayerNorm entries, and check every remaining key and shape.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The official Block builds LayerNorms it never calls; their parameters are in every checkpoint.
UNUSED_KEY = re.compile(r"^block\.\d+\.norm[12]\.(weight|bias)$")
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")


class CheckpointMismatchError(KeyError, ValueError):
    """Keys or shapes of a checkpoint do not match the model; the message lists them by name."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _unwrap(obj: object, source: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict, got {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            logger.info("%s: using the %r entry", source, key)
            return obj[key]
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{source}: neither a state_dict (name -> tensor) nor a dict with one of {WRAPPER_KEYS}; "
            f"top-level keys: {sorted(obj)[:10]}"
        )
    return obj


def read_v1_state_dict(path_or_state_dict: str | os.PathLike | Mapping) -> dict[str, torch.Tensor]:
    """The official checkpoint's state_dict with the ``module.`` prefix and unused LayerNorms removed."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = os.fspath(path_or_state_dict)
        # timm's CheckpointSaver also stores the argparse Namespace of the run: allow just that class
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(source, map_location="cpu", weights_only=True)
    else:
        source, obj = "state_dict", path_or_state_dict
    state = _unwrap(obj, source)
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if UNUSED_KEY.match(name):
            continue
        cleaned[name] = value
    return cleaned


def load_spikformer_v1_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping,
    *,
    ignore: Iterable[str] = (),
    strict: bool = True,
) -> list[str]:
    """Load official Spikformer V1 weights into ``model``; returns the model keys left untouched.

    ``ignore``: regular expressions of checkpoint keys to drop (e.g. ``r"^head\\."`` to keep a new
    head). ``strict=False`` allows model keys the checkpoint lacks (e.g. a V2 stem's supplementary
    layers); unexpected keys and shape mismatches always raise. Raises ``CheckpointMismatchError``
    (a KeyError and a ValueError) naming every missing/unexpected key and mismatched shape.
    """
    patterns = [re.compile(p) for p in ignore]
    state = {k: v for k, v in read_v1_state_dict(path_or_state_dict).items() if not any(p.search(k) for p in patterns)}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not any(p.search(k) for p in patterns))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    )
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if missing and strict:
        problems.append(f"missing keys: {missing}")
    if shapes:
        problems.append(f"shape mismatches: {shapes}")
    if problems:
        raise CheckpointMismatchError("V1 checkpoint does not match the model; " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    if missing:
        logger.warning("V1 checkpoint: %d model keys not in the checkpoint kept their values", len(missing))
    return missing
