"""Which checkpoint tag to resume from: the newest published tag whose files verify, else an older kept one.

A tag is usable when
- every file its digest.json lists is there with that size and sha256 (pipeline.train.checkpoint_digest), and
- every `.pt` file opens under weights-only loading (only the pickle is read, mmap'd: this catches a
  truncated archive and a file that would run code, before DeepSpeed touches anything).
Candidates, in order: for each folder (Ray's resume_dir, then the stage's own checkpoint folder) the
tag `latest` names, then the older tags kept beside it, newest first. Tags newer than `latest` were
never published (a save that died) and are never candidates.

A tag without digest.json can only be one written before digests existed (the digest is written
before `latest` moves). It is accepted with a warning: it still loads weights-only, and refusing it
would throw away the progress of every run checkpointed before the upgrade; only its bytes go
unverified, as they always did.

Collective: rank 0 lists the candidates and reads each digest from its copy; every rank checks an
equal share of the files (file i on rank i mod world) in its own copy of the folder (Ray hands each
rank one; under torchrun the ranks of a node share it), so hashing a big tag is split over the ranks;
the problems are gathered and every rank takes the same decision.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.train import collectives
from pipeline.train.checkpoint import LATEST_FILE, step_of_tag
from pipeline.train.checkpoint_digest import DIGEST_FILE, DigestError, FileDigest, check_file, read_digest
from pipeline.train.checkpoint_io import UnsafeCheckpoint, load_weights_only

logger = logging.getLogger(__name__)

_CHECKED = "sizes and sha256 against each tag's digest.json, weights-only opening of every .pt file"


@dataclass
class Selection:
    folder: str  # this rank's copy of the folder holding the tag
    tag: str
    legacy: bool = False  # no digest.json (written before digests existed): bytes not verified
    rejected: list[str] = field(default_factory=list)  # "<folder>/<tag>: <problems>" per refused newer tag

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.tag)


def _candidates(folders: Sequence[str | None], tag: str | None, require_first: bool) -> tuple[list, list, str | None]:
    """Rank 0: ([(folder index, tag)], [rejections known already], error or None)."""
    if tag is not None:
        folder = folders[0]
        if not folder or not (Path(folder) / tag).is_dir():
            return [], [], f"checkpoint tag {tag!r} not found in {folder}"
        return [(0, tag)], [], None
    found, rejected = [], []
    for index, folder in enumerate(folders):
        pointer = Path(folder) / LATEST_FILE if folder else None
        if pointer is None or not pointer.is_file():
            if index == 0 and require_first and folder and Path(folder).is_dir():
                return [], [], f"resume folder {folder} has no '{LATEST_FILE}' checkpoint"
            continue
        latest = pointer.read_text().strip()
        latest_step = step_of_tag(latest)
        if not (Path(folder) / latest).is_dir():
            rejected.append(f"{Path(folder) / latest}: named by {pointer} but missing")
        if latest_step is None:  # a tag name of another scheme (DeepSpeed's global_stepN): that one only
            found += [(index, latest)] if (Path(folder) / latest).is_dir() else []
            continue
        steps = ((step_of_tag(p.name), p.name) for p in Path(folder).iterdir() if p.is_dir())
        tags = sorted(((step, name) for step, name in steps if step is not None and step <= latest_step), reverse=True)
        found += [(index, name) for _, name in tags]
    return found, rejected, None


def _listing(tag_dir: Path) -> tuple[list[tuple[str, FileDigest | None]], bool, str | None]:
    """Rank 0: (files to check, legacy, problem) for one tag, from its digest or (legacy) its folder."""
    try:
        files = read_digest(tag_dir)
    except DigestError as err:
        return [], False, str(err)
    if files is not None:
        return sorted(files.items()), False, None
    names = sorted(p.name for p in tag_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not names:
        return [], True, "no files"
    return [(name, None) for name in names], True, None


def check_one(tag_dir: str | os.PathLike, name: str, expected: FileDigest | None, legacy: bool) -> str | None:
    """What is wrong with one file of a tag (a phrase naming it), or None."""
    path = Path(tag_dir) / name
    if expected is not None:
        problem = check_file(tag_dir, name, expected)
        if problem:
            return problem
    elif not path.is_file():
        return f"{name}: missing"
    if name.endswith(".pt"):
        try:
            state = load_weights_only(str(path), "cpu", mmap=True, legacy=legacy)
            del state
        except UnsafeCheckpoint as err:
            return f"{name}: {str(err).split(': ', 1)[-1]}"
        except Exception as err:  # noqa: BLE001 - any failure to open is a reason to refuse the tag
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            return f"{name}: torch.load fails ({type(err).__name__}: {first[:200]})"
    return None


def _verify(folder: str, tag: str, files: list[tuple[str, FileDigest | None]], legacy: bool) -> list[str]:
    """Every rank checks its share of `files` in its copy of the tag; all problems, on every rank."""
    rank, world = collectives.world()
    tag_dir = Path(folder) / tag
    mine = [check_one(tag_dir, name, expected, legacy) for name, expected in files[rank::world]]
    problems = collectives.all_gather_objects([p for p in mine if p])
    return sorted(p for share in problems for p in share)


def select(folders: Sequence[str | None], *, tag: str | None = None, require_first: bool = False) -> Selection | None:
    """The tag to resume from, verified. `folders` are this rank's copies, in order of preference.

    None when no folder has a published checkpoint (a fresh start). With `tag`, only that tag of
    folders[0] is considered. Raises PipelineError (one line, on every rank) when tags were found but
    none verifies, naming each tag and what was wrong with it. Collective."""
    rank, _ = collectives.world()
    warn = logger.warning if rank == 0 else logger.debug  # every rank decides alike; one says so
    plan = _candidates(folders, tag, require_first) if rank == 0 else None
    candidates, rejected, error = collectives.broadcast_from_rank0(plan)
    if error:
        raise PipelineError(error)
    if not candidates and not rejected:
        return None
    for index, name in candidates:
        folder = str(folders[index])
        listing = _listing(Path(folder) / name) if rank == 0 else None
        files, legacy, problem = collectives.broadcast_from_rank0(listing)
        problems = [problem] if problem else _verify(folder, name, files, legacy)
        if problems:
            rejected.append(f"{Path(folder) / name}: {'; '.join(problems)}")
            warn("checkpoint %s/%s is not usable: %s", folder, name, "; ".join(problems))
            continue
        if legacy:
            warn("checkpoint %s/%s has no %s (written before checkpoints had digests): its files open "
                           "weights-only, but their bytes are not verified", folder, name, DIGEST_FILE)
        if rejected:
            warn("resuming from %s/%s, the newest checkpoint that verifies (%d newer rejected)",
                           folder, name, len(rejected))
        return Selection(folder, name, legacy, rejected)
    raise PipelineError(f"no usable checkpoint (checked {_CHECKED}): {' | '.join(rejected)}")
