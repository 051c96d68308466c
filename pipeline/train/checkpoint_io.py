"""How DeepSpeed's checkpoint files are written and read: hashed while written, a full disk named,
and loaded weights-only, so no code stored in a checkpoint ever runs.

DeepSpeed writes and reads every file of a tag through its engine's `checkpoint_engine` (save/load);
its default TorchCheckpointEngine loads with `torch.load(weights_only=False)`, which runs whatever
a pickle asks for. `install` swaps in SafeCheckpointEngine (a subclass: same files, same format):
- load: `torch.load(weights_only=True)` with only the DeepSpeed classes its checkpoints hold
  allowlisted (found by trying every ZeRO stage in fp32 and bf16 with
  `torch.serialization.get_unsafe_globals_in_checkpoint`). Our own client_state is plain tensors,
  numbers, strings and tuples (pipeline.train.checkpoint stores numpy's RNG state as a tensor).
- save: each file goes through a HashingWriter, so the tag's digest costs no second read. A full
  disk (ENOSPC, EDQUOT, or EFBIG from a file-size limit) is recorded, not raised: DeepSpeed's
  save_checkpoint ends with a barrier, and a rank that raised out of it would leave the others
  waiting there. The caller (pipeline.train.checkpoint.save) asks every rank after the save.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from pipeline.errors import PipelineError
from pipeline.train.checkpoint_digest import FileDigest, HashingWriter

# errnos that mean "the storage is full", whatever the layer that reports them
STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _deepspeed_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _numpy_globals() -> list[Any]:
    """What numpy's RNG state array needs; only tags written before digests existed hold one."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@contextlib.contextmanager
def allowed_globals(legacy: bool = False) -> Iterator[None]:
    extra = _numpy_globals() if legacy else []
    with torch.serialization.safe_globals(_deepspeed_globals() + extra):
        yield


class UnsafeCheckpoint(PipelineError):
    """A checkpoint file asks the unpickler for something weights-only loading refuses."""


def load_weights_only(path: str, map_location: Any = "cpu", *, mmap: bool = False, legacy: bool = False) -> Any:
    """torch.load of a checkpoint file that runs no pickled code. mmap=True reads only the pickle
    (tensor data stays on disk): a cheap check that the file opens and holds only allowed types."""
    try:
        with allowed_globals(legacy):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpoint(f"{path}: refused by weights-only loading ({reason})") from None


@dataclass
class WriteFailure:
    """The first file this rank could not write because its storage was full."""

    path: str
    errno: int
    written: int  # bytes of that file written before it failed

    def describe(self) -> str:
        return f"{self.path}: {os.strerror(self.errno)} after {_mb(self.written)} of it"


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with weights-only loads and hashed, fault-recording saves."""

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.written: dict[str, FileDigest] = {}  # path -> digest of each file saved since begin()
        self.failure: WriteFailure | None = None
        self.legacy = False  # allow numpy's RNG array (tags from before digests existed)

    def begin(self) -> None:
        self.written, self.failure = {}, None

    def save(self, state_dict: Any, path: str) -> None:
        if self.failure is not None:
            return  # the storage is full: don't try every other file of the tag too
        writer = None
        try:
            with open(path, "wb") as raw:
                writer = HashingWriter(raw)
                torch.save(state_dict, writer, _use_new_zipfile_serialization=self.zipfile_serialization)
        except (OSError, RuntimeError) as err:
            code = storage_errno(err, writer.error if writer is not None else None)
            if code is None:
                raise
            written = writer.size if writer is not None else 0
            self.failure = WriteFailure(path, code, written)
            return
        self.written[path] = writer.digest()

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_weights_only(path, map_location, legacy=self.legacy)


def install(ds_engine: Any) -> SafeCheckpointEngine:
    """Put a SafeCheckpointEngine into a DeepSpeed engine (once); returns it."""
    current = ds_engine.checkpoint_engine
    if isinstance(current, SafeCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise PipelineError(
            f"deepspeed.config_overrides selects the checkpoint engine {type(current).__name__}; the pipeline "
            "needs DeepSpeed's default TorchCheckpointEngine (it verifies and loads checkpoints weights-only): "
            "remove the 'checkpoint.writer' / 'datastates' override"
        )
    safe = SafeCheckpointEngine(ds_engine._config)
    ds_engine.checkpoint_engine = safe
    copy_scripts = getattr(ds_engine, "_copy_recovery_script", None)
    if copy_scripts is not None:
        # rank 0 copies zero_to_fp32.py beside the tags on every ZeRO save, outside the checkpoint
        # engine: a full disk there must be recorded too, not raised before DeepSpeed's barrier
        def guarded(save_path: str) -> None:
            if safe.failure is not None:
                return
            try:
                copy_scripts(save_path)
            except OSError as err:
                code = storage_errno(err)
                if code is None:
                    raise
                safe.failure = WriteFailure(str(err.filename or save_path), code, 0)

        ds_engine._copy_recovery_script = guarded
    return safe


def storage_errno(err: BaseException, known: OSError | None = None) -> int | None:
    """The errno of a full storage behind `err` (its cause/context chain, or `known`), else None."""
    seen: set[int] = set()
    candidates: list[BaseException | None] = [known, err]
    while candidates:
        item = candidates.pop(0)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno in STORAGE_FULL:
            return item.errno
        candidates += [item.__cause__, item.__context__]
    return None


def _mb(n: int) -> str:
    """Bytes for a person: 512 B, 26.5 kB, 3.6 MB, 2.4 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def free_bytes(path: str) -> int | None:
    """Free bytes for an unprivileged writer on the file system holding `path` (or its parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def describe_full(failure: WriteFailure, needed: tuple[str, int] | None) -> str:
    """One phrase: the file, the error, what a tag needed last time, what is free."""
    parts = [failure.describe()]
    if needed is not None:
        parts.append(f"a whole tag needs about {_mb(needed[1])} ({needed[0]} had that)")
    free = free_bytes(os.path.dirname(failure.path))
    if free is not None:
        parts.append(f"{_mb(free)} free there")
    return "; ".join(parts)
