"""Make this venv look like the lent H200's image, for the dry run of benchmarks/gpu_check.sh.

Put this folder first on PYTHONPATH and every Python process started under it (torchrun's workers and
DataLoader workers too) hides the modules of each installed distribution that is neither in the image
nor carried there as a wheel (benchmarks/gpu_packages.py): importing one raises ModuleNotFoundError, as
on the device. So a module-level `import ray` (or Flask, boto3, ...) on the GPU path fails the dry run
on a CPU instead of the GPU run. Hiding is by file: a module whose file belongs only to hidden
distributions is hidden (full mlflow's extra files are, the mlflow-skinny files they share are not).
The venv's copies of the image's packages may be newer than the image's and need more: what they
require (as installed here) is kept visible too, so only the project's own needs are judged.

DEVICE_SIM_HIDDEN=FILE caches the hidden file list (computed once, then read by every process);
DEVICE_SIM_LOG=FILE gets one line per hidden module that something tried to import;
DEVICE_SIM_EXTRA_HIDE=NAME,NAME hides these distributions too (to see the dry run fail without a wheel).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
from importlib import metadata
from pathlib import Path

_PROJECT = {"spikformer-pipeline"}


def _packages():
    path = Path(__file__).resolve().parents[1] / "gpu_packages.py"
    spec = importlib.util.spec_from_file_location("_gpu_packages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def hidden_files() -> set[str]:
    """Absolute paths of the module files (.py, .so) that only hidden distributions install."""
    packages = _packages()
    dists = {_normal(d.metadata["Name"] or ""): d for d in metadata.distributions()}
    extra = {_normal(n) for n in os.environ.get("DEVICE_SIM_EXTRA_HIDE", "").split(",") if n}
    on_device = {_normal(n) for n in (*packages.CARRIED, *packages.BUILT)} | _PROJECT
    on_device -= extra
    todo = [_normal(n) for n in packages.IMAGE_PACKAGES]
    while todo:  # the image's packages and, at the venv's versions, what they need
        name = todo.pop()
        if name in on_device or name in extra or name not in dists:
            continue
        on_device.add(name)
        todo.extend(_normal(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]) for req in dists[name].requires or ()
                    if "extra ==" not in req)
    hidden: set[str] = set()
    kept: set[str] = set()
    for name, dist in dists.items():
        files = {str(dist.locate_file(f).resolve()) for f in dist.files or () if str(f).endswith((".py", ".so"))}
        (kept if name in on_device else hidden).update(files)
    return hidden - kept


def _load() -> frozenset[str]:
    cache = os.environ.get("DEVICE_SIM_HIDDEN")
    key = os.environ.get("DEVICE_SIM_EXTRA_HIDE", "")
    if cache and os.path.exists(cache):
        with open(cache) as fh:
            saved = json.load(fh)
        if saved.get("extra_hide") == key:
            return frozenset(saved["files"])
    files = hidden_files()
    if cache:
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"extra_hide": key, "files": sorted(files)}, fh)
        os.replace(tmp, cache)
    return frozenset(files)


class HideOffDevice(importlib.abc.MetaPathFinder):
    def __init__(self, files: frozenset[str]) -> None:
        self.files = files
        self.log = os.environ.get("DEVICE_SIM_LOG")

    def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not spec.origin or os.path.realpath(spec.origin) not in self.files:
            return None  # not hidden: the normal finders take it from here
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(f"{name}\n")
        raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image: hidden by device_sim)",
                                  name=name)


sys.meta_path.insert(0, HideOffDevice(_load()))
