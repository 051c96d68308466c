"""DeepSpeed-native checkpoints with our own atomic `latest` pointer, a digest per tag, pruning and
per-rank RNG state.

Layout of a checkpoint folder (a local path; Ray Train uploads it later):
    <dir>/step00000200/...   one DeepSpeed tag per save (`save_checkpoint(..., save_latest=False)`)
    <dir>/step00000200/digest.json   every file of the tag with size and sha256 (checkpoint_digest)
    <dir>/latest             the tag to resume from, same format as DeepSpeed's own file, so
                             `load_checkpoint(dir)` and DeepSpeed's zero_to_fp32 tools read it too

Order of a save: every rank writes its part of the tag (hashed as it is written, checkpoint_io) ->
the ranks exchange their files' digests and any write failure -> the writer rank writes digest.json,
then replaces `latest` atomically (tmp file + fsync + os.replace) -> older tags are pruned. A kill at
any point leaves `latest` naming a complete tag. Pruning never deletes the tag `latest` names.
A full disk (or quota, or file-size limit) on any rank ends the save on every rank with one
PipelineError naming the file, what a tag needs and what is free; the torn tag is removed and
`latest` is not touched.

Loading: checkpoint_verify picks the newest tag that verifies (falling back to older kept tags), and
DeepSpeed reads it through checkpoint_io's weights-only engine, so no pickled code runs. Our own
client_state is pickle-free for that reason: numpy's RNG state is stored as a tensor.
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
from pipeline.train import checkpoint_io, collectives
from pipeline.train.checkpoint_digest import DIGEST_FILE, FileDigest, hash_file, tag_size, write_digest

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
    try:
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, pointer)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: `latest` keeps its old content
        raise
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
    """This process's RNG states, pickle-free (tensors, numbers, strings, tuples) so that a checkpoint
    holding them loads weights-only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy()
    np.random.set_state((kind, np.asarray(keys).astype(np.uint32), *rest))  # tags before digests: an ndarray
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
    """Write tag `step<N>` on all ranks, its digest, then publish it as `latest` and prune. Collective."""
    tag = tag_for_step(step)
    tag_dir = os.path.join(str(ckpt_dir), tag)
    io = checkpoint_io.install(ds_engine)
    io.begin()
    write_tag(ds_engine, ckpt_dir, step, client_state)
    written = {os.path.relpath(path, tag_dir): digest for path, digest in io.written.items()}
    outcomes = collectives.all_gather_objects((io.failure, written))  # also: every rank's files are complete
    failures = [(rank, failure) for rank, (failure, _) in enumerate(outcomes) if failure is not None]
    if failures:
        _abandon(ckpt_dir, tag, failures)
    files: dict[str, FileDigest] = {}
    for _, share in outcomes:
        files.update(share)
    failure = None
    if is_writer:
        try:
            _finish(ckpt_dir, tag, files, keep_last)
        except OSError as err:
            code = checkpoint_io.storage_errno(err)
            if code is None:
                raise
            failure = checkpoint_io.WriteFailure(getattr(err, "filename", None) or tag_dir, code, 0)
    failures = [(rank, f) for rank, f in enumerate(collectives.all_gather_objects(failure)) if f is not None]
    if failures:  # nobody reads `latest` before this point: it was not moved, or moved and is fine
        _abandon(ckpt_dir, tag, failures)
    if not os.path.exists(os.path.join(tag_dir, DIGEST_FILE)):
        # a rank-private folder (Ray gives each rank its own work_dir): the digest of the whole tag
        # goes beside this rank's files too, so the folder it reports carries one
        write_digest(tag_dir, tag, files)
    logger.info("checkpoint %s/%s saved", ckpt_dir, tag)
    return tag


def _finish(ckpt_dir: str | os.PathLike, tag: str, files: dict[str, FileDigest], keep_last: int) -> None:
    """The writer's part once every rank's files are complete: digest, `latest`, pruning."""
    tag_dir = Path(ckpt_dir) / tag
    for path in tag_dir.iterdir():  # a file DeepSpeed wrote outside its checkpoint engine (none in 0.19)
        if path.is_file() and path.name not in files and path.name != DIGEST_FILE and not path.name.startswith("."):
            files[path.name] = hash_file(path)
    write_digest(tag_dir, tag, files)
    publish_latest(ckpt_dir, tag)
    prune_tags(ckpt_dir, keep_last, tag)


def _abandon(ckpt_dir: str | os.PathLike, tag: str, failures: list[tuple[int, checkpoint_io.WriteFailure]]) -> None:
    """A full storage on some rank: remove the torn tag (every rank, its copy) and raise the same one
    line on every rank."""
    tag_dir = Path(ckpt_dir) / tag
    latest = None
    pointer = Path(ckpt_dir) / LATEST_FILE
    if pointer.is_file():
        latest = pointer.read_text().strip()
    if latest != tag:
        shutil.rmtree(tag_dir, ignore_errors=True)
    needed = None
    if latest and latest != tag:
        size = tag_size(Path(ckpt_dir) / latest)
        needed = (latest, size) if size else None
    rank, failure = failures[0]
    more = f" (and on {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
    where = f"`latest` still names {latest}" if latest and latest != tag else "no earlier checkpoint"
    raise PipelineError(
        f"checkpoint {tag} not saved, the storage is full: rank {rank} could not write "
        f"{checkpoint_io.describe_full(failure, needed)}{more}. The unfinished tag was removed; {where}"
    )


def write_tag(ds_engine: Any, ckpt_dir: str | os.PathLike, step: int, client_state: dict[str, Any]) -> str:
    """The DeepSpeed part of a save, without publishing it (a crash after this leaves `latest` as it was).

    A full storage while DeepSpeed writes its files is recorded in the engine's SafeCheckpointEngine
    (`failure`), not raised, so every rank gets through DeepSpeed's closing barrier."""
    tag = tag_for_step(step)
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        ds_engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except OSError as err:  # DeepSpeed's own writes (folders, its recovery script) outside the engine
        code = checkpoint_io.storage_errno(err)
        if code is None:
            raise
        _abandon(ckpt_dir, tag, [(collectives.world()[0],
                                  checkpoint_io.WriteFailure(err.filename or str(ckpt_dir), code, 0))])
    return tag


def load(ds_engine: Any, ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict[str, Any] | None:
    """Load `tag` (default: the newest tag in `ckpt_dir` that verifies) into the engine; returns its
    client_state, or None when the folder has no published checkpoint. Collective."""
    from pipeline.train.checkpoint_verify import select  # it imports this module

    selection = select([str(ckpt_dir)], tag=tag)
    return None if selection is None else load_selected(ds_engine, selection)


def load_selected(ds_engine: Any, selection: Any) -> dict[str, Any]:
    """Load a tag checkpoint_verify.select picked, weights-only; returns its client_state. Collective."""
    io = checkpoint_io.install(ds_engine)
    io.legacy = selection.legacy
    try:
        load_path, client_state = ds_engine.load_checkpoint(
            selection.folder, tag=selection.tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    except PipelineError:
        raise
    except Exception as err:  # verified a moment ago: the files changed since, or DeepSpeed disagrees
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise PipelineError(f"DeepSpeed could not load checkpoint {selection.path}: {type(err).__name__}: {first}") \
            from err
    finally:
        io.legacy = False
    if load_path is None:
        raise PipelineError(f"DeepSpeed could not load checkpoint {selection.path} (see the log above)")
    logger.info("resumed from %s", load_path)
    return client_state or {}
