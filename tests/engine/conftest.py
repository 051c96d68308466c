"""Launch helper for the engine tests: `torch.distributed.run` with 2 CPU processes on gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "_dist_train.py"

# A tests/ folder on sys.path (pytest puts it there for any tests/<pkg>/__init__.py) makes `import models`
# find the tests/models folder as a namespace package; the repo root on sys.path makes the real one win.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *args: str, nproc: int = 2, timeout: int = 300) -> list[dict]:
    """Run _dist_train.py under torchrun; return each rank's result JSON.

    CXX points nowhere and TORCH_EXTENSIONS_DIR is private, so any C++ JIT build DeepSpeed might
    attempt fails the run (and would leave a folder behind that the tests look for).
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CXX": "/nonexistent/c++",
        "CC": "/nonexistent/cc",
        "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("PIPELINE_DS_SHM_COMM", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(SCRIPT),
        "--out",
        str(out),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"distributed run failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module", params=[pytest.param(0, marks=pytest.mark.slow), 1, 2, 3], ids=lambda z: f"zero{z}")
def run(request, tmp_path_factory):
    """One 2-process launch of _dist_train.py per ZeRO stage (ZeRO-2 also uses layer-wise lr decay).

    ZeRO 1-3 are the default suite; ZeRO-0 (plain data parallel) runs with `make test-slow`."""
    zero = request.param
    out = tmp_path_factory.mktemp(f"engine_zero{zero}")
    args = ["--zero", str(zero)] + (["--layer-decay", "0.75"] if zero == 2 else [])
    return {"zero": zero, "out": out, "ranks": launch(out, *args)}
