"""Write-once objects on any fsspec store: create a file only if no file has that name yet.

The shard writer publishes manifests and build claims with `create_exclusive`, so a manifest, once
there, is never replaced, and of two builds racing for one folder exactly one gets the claim:

- local files: write `<name>.tmp-<uuid>`, then `os.link` it to the final name (fails if the name
  exists; the file appears complete, never half written), then drop the temporary name;
- memory://: `pipe_file(mode="create")`, atomic within the process;
- s3:// (and any store whose fsspec backend supports it): one PUT with `If-None-Match: *`,
  which S3 (and moto) refuse with 412 when the key exists; s3fs turns that into FileExistsError.
  Backends without exclusive create (fsspec's default `pipe_file(mode="create")`) check, then
  write: correct for one writer at a time, not proof against a race.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from typing import Any

from pipeline.data import fsutil
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def create_exclusive(url: str, data: bytes) -> bool:
    """Write `data` under `url` unless something is there already; True if this call created it."""
    fs, path = fsutil.url_to_fs(url)
    try:
        if fsutil.protocols(fs) & {"file", "local"}:
            _link_local(path, data)
        else:
            try:
                fs.pipe_file(path, data, mode="create")
            except TypeError:  # a backend whose pipe_file has no `mode`: check, then write (not race-free)
                logger.warning("%s: this store cannot create exclusively; checking first instead", url)
                if fs.exists(path):
                    return False
                fsutil.atomic_write_bytes(url, data)
    except FileExistsError:
        return False
    except Exception as exc:
        raise PipelineError(f"{url}: cannot write: {fsutil.describe_fs_error(exc)}") from None
    return True


def _link_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # atomic, and refuses an existing name (rename would replace it)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_json(url: str) -> dict[str, Any] | None:
    """The JSON object at `url`, or None when there is no such file."""
    fs, path = fsutil.url_to_fs(url)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise PipelineError(f"{url}: cannot read: {fsutil.describe_fs_error(exc)}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{url}: not valid JSON ({exc}); delete it if no build is running") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{url}: expected a JSON object")
    return value


def remove(url: str) -> None:
    """Delete `url` if it exists (a second remover finds nothing, which is fine)."""
    fs, path = fsutil.url_to_fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
