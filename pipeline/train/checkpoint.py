"""DeepSpeed-native checkpoints with our own atomic `latest` pointer, pruning and per-rank RNG state.

Layout of a checkpoint folder (a local path; Ray Train uploads it later):
    <dir>/step00000200/...   one DeepSpeed tag per save (`save_checkpoint(..., save_latest=False)`)
    <dir>/latest             the tag to resume from, same format as DeepSpeed's own file, so
                             `load_checkpoint(dir)` and DeepSpeed's zero_to_fp32 tools read it too

Order of a save: every rank writes its part of the tag -> barrier -> the writer rank replaces
`latest` atomically (tmp file + fsync + os.replace) -> older tags are pruned. A kill at any point
leaves `latest` naming a complete tag. Pruning never deletes the tag `latest` names.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.train import collectives

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
_TAG_RE = re.compile(r"^step(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def step_of_tag(tag: str) -> int | None:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def read_latest(ckpt_dir: str | os.PathLike) -> str | None:
    """The tag `latest` names, or None when the folder holds no finished checkpoint."""
    pointer = Path(ckpt_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise PipelineError(f"{pointer} names tag {tag!r}, but {Path(ckpt_dir) / tag} does not exist")
    return tag


def publish_latest(ckpt_dir: str | os.PathLike, tag: str) -> None:
    """Point `latest` at `tag` atomically: readers see the old or the new name, never a partial file."""
    pointer = Path(ckpt_dir) / LATEST_FILE
    tmp = pointer.with_name(f".{LATEST_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pointer)
    dir_fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def prune_tags(ckpt_dir: str | os.PathLike, keep_last: int, latest: str) -> list[str]:
    """Delete step tags except the `keep_last` newest up to `latest` (which is always kept).

    Tags newer than `latest` are leftovers of a save that never got published (a crash, or a run
    that resumed from an earlier step); they are deleted too.
    """
    latest_step = step_of_tag(latest)
    tags = sorted(
        (step, p.name) for p in Path(ckpt_dir).iterdir() if p.is_dir() and (step := step_of_tag(p.name)) is not None
    )
    eligible = [name for step, name in tags if latest_step is None or step <= latest_step]
    keep = set(eligible[-keep_last:]) | {latest}
    deleted = [name for _, name in tags if name not in keep]
    for name in deleted:
        shutil.rmtree(Path(ckpt_dir) / name, ignore_errors=True)
    if deleted:
        logger.info("pruned checkpoints %s in %s", deleted, ckpt_dir)
    return deleted


# --------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order, on every rank (DeepSpeed saves client_state from rank 0
    under ZeRO 0-2, so per-rank states must travel to it)."""
    return collectives.all_gather_objects(capture_rng())


# --------------------------------------------------------------------------- save / load


def save(
    ds_engine: Any,
    ckpt_dir: str | os.PathLike,
    step: int,
    client_state: dict[str, Any],
    *,
    keep_last: int,
    is_writer: bool,
) -> str:
    """Write tag `step<N>` on all ranks, then publish it as `latest` and prune. Collective."""
    tag = write_tag(ds_engine, ckpt_dir, step, client_state)
    collectives.barrier()  # every rank has finished its files of this tag
    if is_writer:
        publish_latest(ckpt_dir, tag)
        prune_tags(ckpt_dir, keep_last, tag)
    collectives.barrier()  # nobody reads `latest` before it is published
    logger.info("checkpoint %s/%s saved", ckpt_dir, tag)
    return tag


def write_tag(ds_engine: Any, ckpt_dir: str | os.PathLike, step: int, client_state: dict[str, Any]) -> str:
    """The DeepSpeed part of a save, without publishing it (a crash after this leaves `latest` as it was)."""
    tag = tag_for_step(step)
    os.makedirs(ckpt_dir, exist_ok=True)
    ds_engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    return tag


def load(ds_engine: Any, ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict[str, Any] | None:
    """Load `tag` (default: the one `latest` names) into the engine; returns its client_state.

    Returns None when the folder has no published checkpoint. Collective.
    """
    if tag is None:
        if not Path(ckpt_dir).is_dir():
            return None
        tag = read_latest(ckpt_dir)
        if tag is None:
            return None
    elif not (Path(ckpt_dir) / tag).is_dir():
        raise PipelineError(f"checkpoint tag {tag!r} not found in {ckpt_dir}")
    load_path, client_state = ds_engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise PipelineError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag} (see the log above)")
    logger.info("resumed from %s", load_path)
    return client_state or {}
