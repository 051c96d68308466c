"""The GPU check's first step: what this machine runs, and whether everything the run needs imports.

    python benchmarks/gpu_env.py --json FILE [--expect-cuda]

Records Python, torch/CUDA, the GPU, the version and location of every installed distribution (the
image's real versions: `benchmarks/gpu_wheels_check.py --image-versions` takes that list), `pip check`
lines that name a carried package, and one import of each module the run needs. Exit status 1 when an
import fails, or with --expect-cuda when torch sees no GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_packages import BUILT, CARRIED  # noqa: E402

NEEDED = ("torch", "triton", "timm", "deepspeed", "pydantic", "webdataset", "mlflow", "sqlalchemy", "alembic",
          "models", "pipeline.config", "pipeline.train.engine", "pipeline.tracking")


def try_import(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 (any failure is the finding)
        return "FAILED: " + traceback.format_exc(limit=1).strip().splitlines()[-1]
    return getattr(module, "__version__", "ok")


def distributions() -> list[dict]:
    rows = []
    for dist in metadata.distributions():
        rows.append({"name": dist.metadata["Name"], "version": dist.version, "location": str(dist.locate_file(""))})
    return sorted(rows, key=lambda r: (str(r["name"]).lower(), r["location"]))


def pip_check() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    carried = {n.lower() for n in (*CARRIED, *BUILT)} | {n.lower().replace("-", "_") for n in (*CARRIED, *BUILT)}
    return [line for line in done.stdout.splitlines() if any(word.lower().strip(",") in carried
                                                            for word in line.split())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--expect-cuda", action="store_true", help="fail when torch sees no GPU")
    args = parser.parse_args(argv)
    imports = {name: try_import(name) for name in NEEDED}
    import torch

    cuda = torch.cuda.is_available()
    result = {
        "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "imports": imports, "pip_check_carried": pip_check(), "distributions": distributions(),
    }
    failed = [name for name, state in imports.items() if state.startswith("FAILED")]
    result["problems"] = [f"import {name}: {imports[name]}" for name in failed]
    if args.expect_cuda and not cuda:
        result["problems"].append("torch sees no CUDA device")
    args.json.write_text(json.dumps(result, indent=1))
    print(f"python {result['python']}, torch {result['torch']} (CUDA {result['cuda']}), {result['device_name']}")
    for name, state in imports.items():
        print(f"  {name:<18} {state}")
    for line in result["pip_check_carried"]:
        print(f"  pip check: {line}")
    for problem in result["problems"]:
        print(f"PROBLEM: {problem}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
