"""Every collective of `pipeline/` and `models/` goes through pipeline/train/collectives.py, which puts
tensors on the process group's device (NCCL refuses CPU tensors: the first GPU run's evaluate died on
exactly that). Checked on the source, like the import contract: a direct torch.distributed collective
call, a collective imported by name, or timm's distribute_bn anywhere else fails this test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from pipeline.train import collectives

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "pipeline" / "train" / "collectives.py"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
    "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "send",
    "recv", "isend", "irecv", "batch_isend_irecv", "distribute_bn",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def direct_collectives(source: str) -> list[str]:
    """`line: name` of every collective called through a torch.distributed alias or imported by name."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}  # names bound to torch.distributed (import torch.distributed as dist)
    by_name: set[str] = set()  # collectives imported by name (from torch.distributed import all_reduce)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch.distributed" and alias.asname:
                    aliases.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if node.module == "torch" and alias.name == "distributed":
                    aliases.add(alias.asname or "distributed")
                elif (node.module.startswith("torch.distributed") or node.module.startswith("timm.utils")) \
                        and alias.name in COLLECTIVES:
                    by_name.add(alias.asname or alias.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES and _dotted(func.value) in aliases:
            found.append(f"{node.lineno}: {_dotted(func)}")
        elif isinstance(func, ast.Name) and func.id in by_name:
            found.append(f"{node.lineno}: {func.id}")
    return found


def offenders(root: Path) -> list[str]:
    bad = []
    for package in ("pipeline", "models"):
        for path in sorted((root / package).rglob("*.py")):
            if path == root / HELPER.relative_to(REPO):
                continue
            bad += [f"{path.relative_to(root)}:{hit}" for hit in direct_collectives(path.read_text(encoding="utf-8"))]
    return bad


def test_only_the_collectives_helper_calls_torch_distributed_collectives():
    assert offenders(REPO) == []


@pytest.mark.parametrize("snippet", [
    "import torch.distributed as dist\ndef f(t):\n    dist.all_reduce(t)\n",
    "import torch\ndef f(t):\n    torch.distributed.all_reduce(t)\n",
    "from torch import distributed\ndef f(t):\n    distributed.broadcast_object_list([t], src=0)\n",
    "from torch.distributed import all_gather_object as gather\ndef f(x, out):\n    gather(out, x)\n",
    "from timm.utils import distribute_bn\ndef f(m):\n    distribute_bn(m, 2, reduce=True)\n",
])
def test_the_contract_catches_a_direct_collective(tmp_path, snippet):
    (tmp_path / "pipeline" / "stages").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "pipeline" / "stages" / "bad.py").write_text(snippet)
    assert [hit.split(":")[0] for hit in offenders(tmp_path)] == ["pipeline/stages/bad.py"]


def test_collectives_are_placed_on_the_backend_device():
    # NCCL takes CUDA tensors (a mixed "cpu:gloo,cuda:nccl" group too); gloo takes CPU tensors
    assert collectives.device_for_backend("nccl", 3) == torch.device("cuda", 3)
    assert collectives.device_for_backend("cpu:gloo,cuda:nccl", 0) == torch.device("cuda", 0)
    assert collectives.device_for_backend("gloo", None) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        collectives.device_for_backend("nccl", None)


def test_in_one_process_collectives_give_back_the_values():
    # no group, or the one-process group an earlier in-process engine test made: the same values either way
    t = torch.arange(3)
    assert torch.equal(collectives.all_reduce_sum(t), t) and collectives.all_reduce_sum(t).device == t.device
    assert [p.tolist() for p in collectives.all_gather_equal(t)] == [[0, 1, 2]]
    assert collectives.broadcast_from_rank0({"a": 1}) == {"a": 1}
    assert collectives.all_gather_objects(5) == [5]
    assert collectives.world() == (0, 1)
