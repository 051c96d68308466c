"""The layering, checked on the source (an import-linter style contract, with no extra tool):

- `models` imports nothing of `pipeline`;
- nothing in `pipeline/stages/` or `pipeline/train/` imports a runner, the CLI, Ray or MLflow, directly
  or through the project modules it imports (stages and their training loop run the same under any
  backend and in tests);
- only `pipeline/__main__.py` imports `pipeline.commands` (commands may import each other).
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNNER_OR_CLI = ("pipeline.runner", "pipeline.launch_local", "pipeline.commands", "pipeline.__main__")
FORBIDDEN_IN_STAGES = (*RUNNER_OR_CLI, "ray", "mlflow")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str) -> set[str]:
    """Every module an import statement in `source` names (relative imports resolved)."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def project_graph(root: Path, packages=("models", "pipeline")) -> dict[str, set[str]]:
    graph = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(path, root)
            graph[name] = imports_of(path.read_text(encoding="utf-8"), name)
    return graph


def _hits(names: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, names in graph.items():
        if module.startswith("models") and _hits(names, ("pipeline",)):
            found.append(f"{module} imports {sorted(_hits(names, ('pipeline',)))}")
        if _hits(names, ("pipeline.commands",)) and not module.startswith(("pipeline.commands", "pipeline.__main__")):
            found.append(f"{module} imports the CLI {sorted(_hits(names, ('pipeline.commands',)))}")
        if module.startswith(("pipeline.stages", "pipeline.train")):
            for via, bad in _reachable_forbidden(graph, module):
                found.append(f"{module} reaches {bad}" + (f" through {via}" if via != module else ""))
    return found


def _reachable_forbidden(graph: dict[str, set[str]], start: str) -> list[tuple[str, str]]:
    """(project module, forbidden import) pairs reachable from `start` through project imports."""
    seen, stack, bad = {start}, [start], []
    while stack:
        module = stack.pop()
        names = graph.get(module, set())
        bad += [(module, b) for b in sorted(_hits(names, FORBIDDEN_IN_STAGES))]
        for name in names:
            if name in graph and name not in seen and not _hits({name}, RUNNER_OR_CLI):
                seen.add(name)
                stack.append(name)
    return bad


def test_the_project_keeps_its_layers():
    assert violations(project_graph(REPO)) == []


@pytest.mark.parametrize("line, expected", [
    ("from pipeline.runner.job import run_job", r"pipeline.stages.bad reaches pipeline.runner.job$"),
    ("import ray", r"pipeline.stages.bad reaches ray$"),
    ("from pipeline import tracking", r"pipeline.stages.bad reaches mlflow\S* through pipeline.tracking$"),
])
def test_the_contract_fails_when_a_stage_imports_a_runner_ray_or_mlflow(tmp_path, line, expected):
    for package in ("models", "pipeline"):  # a copy of the project with one bad stage module added
        for path in (REPO / package).rglob("*.py"):
            target = tmp_path / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "pipeline" / "stages" / "bad.py").write_text(f"def run():\n    {line}\n")
    found = violations(project_graph(tmp_path))
    assert any(re.match(expected, v) for v in found), found


def test_the_contract_fails_when_models_import_pipeline_or_a_module_imports_the_cli(tmp_path):
    graph = project_graph(REPO)
    graph["models.bad"] = {"pipeline.config"}
    graph["pipeline.data.bad"] = {"pipeline.commands.run"}
    found = violations(graph)
    assert "models.bad imports ['pipeline.config']" in found
    assert "pipeline.data.bad imports the CLI ['pipeline.commands.run']" in found
