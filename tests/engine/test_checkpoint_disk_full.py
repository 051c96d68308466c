"""A full disk during a checkpoint save (issue 23, item 6): one PipelineError line naming the file, what a
tag needs and what is free, on every rank; the torn tag removed; `latest` untouched; the next save works.

Real DeepSpeed on gloo in a subprocess (_checkpoint_disk_full.py), with a real full storage: a
file-size limit (RLIMIT_FSIZE, EFBIG) always, and a small tmpfs (ENOSPC) where this user may mount one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, _free_port

SCRIPT = Path(__file__).resolve().parent / "_checkpoint_disk_full.py"


def _env(out: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CXX": "/nonexistent/c++", "CC": "/nonexistent/cc",
           "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return env


def _run(out: Path, ckpt: Path, mode: str, nproc: int = 1, limit_rank: int = 0) -> list[dict]:
    args = [str(SCRIPT), "--out", str(out), "--ckpt", str(ckpt), "--mode", mode, "--limit-rank", str(limit_rank)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    proc = subprocess.run([sys.executable, *args], env=_env(out), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _check(results: list[dict], ckpt: Path, reason: str, limit_rank: int = 0) -> None:
    messages = {r["error"] for r in results}
    assert len(messages) == 1, messages  # the same line on every rank
    message = messages.pop()
    assert message is not None and "\n" not in message
    assert message.startswith("checkpoint step00000002 not saved, the storage is full: ")
    assert f"rank {limit_rank} could not write {ckpt}/step00000002/" in message and f"{reason} after " in message
    assert "a whole tag needs about" in message and "(step00000001 had that)" in message and " free there" in message
    assert message.endswith("The unfinished tag was removed; `latest` still names step00000001")
    for r in results:
        assert r["error_type"] == "PipelineError" and r["retryable"] is False  # not retried as a lost worker
        assert r["tags_after_failure"] == ["step00000001"] and r["latest_after_failure"] == "step00000001"
        assert r["latest_after_retry"] == "step00000002"


@pytest.mark.slow
def test_a_file_size_limit_on_the_only_rank_is_one_line_and_leaves_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _check(_run(tmp_path, ckpt, "fsize"), ckpt, "File too large")


def test_a_full_tmpfs_is_one_line_and_leaves_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(ckpt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        _check(_run(tmp_path, ckpt, "fill"), ckpt, "No space left on device")
    finally:
        subprocess.run(["umount", str(ckpt)], check=False)


def test_one_full_rank_stops_the_save_on_every_rank(tmp_path):
    """2 ranks (torchrun): rank 1's storage is full, rank 0's is not; both raise the same line, neither
    waits forever in a collective."""
    ckpt = tmp_path / "checkpoints"
    _check(_run(tmp_path, ckpt, "fsize", nproc=2, limit_rank=1), ckpt, "File too large", limit_rank=1)
