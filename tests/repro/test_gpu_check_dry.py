"""benchmarks/gpu_check.sh does not rot between GPU runs: its dry run (every step on the CPU at tiny sizes,
under the import guard that hides what the H200 image lacks) passes, records sane numbers, and fails
loudly when a step breaks. Also the pieces it stands on: the guard, the step bookkeeping, the wheel check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_report

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "cuda_tests", "lif_bench", "step_eager", "chain", "step_compiled", "pipeline_efficiency"]


def dry_run(tmp_path: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"),
            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "GPU_CHECK_STEPS"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


def record(tmp_path: Path, step: str) -> dict:
    return json.loads((tmp_path / "out" / f"{step}.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_dry_run_passes_every_step_with_sane_results(tmp_path):
    done = dry_run(tmp_path, timeout=1400)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{s}.json" for s in STEPS), "summary.md"])
    records = {s: record(tmp_path, s) for s in STEPS}
    for rec in records.values():
        assert rec["status"] == "passed", rec

    env = records["env"]["result"]
    assert not any(state.startswith("FAILED") for state in env["imports"].values()), env["imports"]
    assert env["cuda_available"] is False  # the dry run hides any GPU

    tests = records["cuda_tests"]["tests"]
    # the interpreter LIF tests, the decode tests on the CPU device and the CPU attention products pass;
    # the CUDA-only ones skip
    assert tests["passed"] >= 8 and tests["skipped"] >= 7 and tests["failures"] == tests["errors"] == 0

    lif = records["lif_bench"]["result"]
    assert {(r["dtype"], r["T"]) for r in lif["rows"]} == {(d, t) for d in ("float32", "bfloat16") for t in (1, 4)}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["gbs"] > 0 for r in lif["rows"])
    assert lif["fused_ran"] is False and lif["copy_gbs"] == {}  # the fused kernels need CUDA

    for step, compiled in (("step_eager", "no"), ("step_compiled", "aot_eager")):
        result = records[step]["result"]
        # the sweep: both modes at both batches (a run the time budget skipped says why), and the best
        # batch of each mode
        runs = {(r["mode"], r["batch"]) for r in result["rows"]} | {(s["mode"], s["batch"]) for s in result["skipped"]}
        assert runs == {(m, b) for m in ("pretrain", "finetune") for b in (2, 4)}
        assert all(s["why"].startswith("time:") for s in result["skipped"]) and len(result["skipped"]) <= 1
        assert set(result["best"]) == {"pretrain", "finetune"} and result["matmul_tflops"] > 0
        for mode, best in result["best"].items():
            fastest = max((r for r in result["rows"] if r["mode"] == mode), key=lambda r: r["images_per_s"])
            assert best["batch"] == fastest["batch"]
        for r in result["rows"]:
            assert r["compiled"] == compiled and r["variant"] == "spikformer_v2_tiny" and r["img"] == 32
            assert r["images_per_s"] > 0 and r["peak_mib"] > 0 and 0 < r["mfu"]
            assert r["tflops"] == pytest.approx(r["images_per_s"] * r["gflops_per_image"] / 1e3)
        flops = {r["mode"]: r["gflops_per_image"] for r in result["rows"]}
        assert flops["pretrain"] > flops["finetune"] > 0  # the MIM decoder adds FLOPs
    for r in records["step_compiled"]["result"]["rows"]:  # one graph, no break, no recompile; a profile
        assert (r["dynamo"]["graphs"], r["dynamo"]["graph_breaks"], r["dynamo"]["recompiles"]) == (1, 0, 0), r
        assert 0 < len(r["profile"]) <= 15 and all(k["ms_per_step"] > 0 for k in r["profile"])

    efficiency = records["pipeline_efficiency"]["result"]
    assert efficiency["args"]["batch"] == records["step_compiled"]["result"]["best"]["pretrain"]["batch"]
    assert efficiency["pipeline"] and all(o["ratio"] > 0 for o in efficiency["pipeline"])

    chain = records["chain"]["result"]
    assert chain["status"] == "passed" and chain["checks"] and all(chain["checks"].values()), chain["checks"]
    # read the store again, independently of gpu_chain.py
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'chain' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gpu-check").experiment_id])
    status = {r.data.tags.get("pipeline.stage", "job"): r.info.status for r in runs}
    assert status == {"job": "FINISHED", "pretrain": "FINISHED", "finetune": "FINISHED", "evaluate": "FINISHED"}

    summary = (out / "summary.md").read_text()
    assert "- result: PASSED" in summary and "dry run" in summary
    assert "step_compiled: pretrain batch 4: dynamo 1 graphs, 0 graph breaks, 0 recompiles" in summary
    assert "top 15 CPU ops by self time" in summary and "Pipeline efficiency" in summary
    for step in STEPS:
        assert f"| {step} | {records[step]['status']} |" in summary
    # the torchrun path never reached for Ray (the image has none, no wheel carries it)
    hidden = (tmp_path / "work" / "device_sim_hidden_imports.log")
    assert "ray" not in (hidden.read_text().split() if hidden.exists() else [])


@pytest.mark.timeout(300)
def test_dry_run_fails_and_says_so_when_a_carried_package_is_missing(tmp_path):
    # as if pydantic had no wheel in .whl: the environment step must fail, and the run with it
    done = dry_run(tmp_path, timeout=280, GPU_CHECK_STEPS="env", DEVICE_SIM_EXTRA_HIDE="pydantic")
    assert done.returncode == 1, done.stdout[-4000:]
    env = record(tmp_path, "env")
    assert env["status"] == "FAILED"
    assert any("pydantic" in p for p in env["problems"]), env["problems"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "- result: FAILED: env" in summary
    assert "hidden by benchmarks/device_sim): pydantic" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["env.json", "summary.md"]  # only that step


def test_device_sim_hides_packages_the_image_lacks_and_only_those(tmp_path):
    code = ("import importlib\n"
            "for name in ('ray', 'flask', 's3fs', 'deepspeed', 'pydantic', 'webdataset', 'mlflow', 'sqlalchemy', "
            "'timm'):\n"
            "    try:\n        importlib.import_module(name); print('STATE', name, 'ok')\n"
            "    except ModuleNotFoundError: print('STATE', name, 'hidden')\n")
    env = {**os.environ, "DEVICE_SIM_HIDDEN": str(tmp_path / "hidden.json"), "OMP_NUM_THREADS": "1"}
    guarded = {**env, "PYTHONPATH": str(REPO / "benchmarks" / "device_sim")}
    seen = subprocess.run([sys.executable, "-c", code], env=guarded, capture_output=True, text=True, timeout=240)
    states = _states(seen.stdout)
    assert states == {"ray": "hidden", "flask": "hidden", "s3fs": "hidden", "deepspeed": "ok", "pydantic": "ok",
                      "webdataset": "ok", "mlflow": "ok", "sqlalchemy": "ok", "timm": "ok"}, seen.stderr[-2000:]
    # control: the venv does have them; the guard is what hides them
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert _states(plain.stdout)["ray"] == "ok"


def test_gpu_step_gives_cuda_an_index():
    from benchmarks import gpu_step

    # torch 2.11's torch.cuda.set_device refuses torch.device("cuda") ("a specified index")
    assert gpu_step.resolve_device("cuda", current_cuda=lambda: 3) == torch.device("cuda", 3)
    assert gpu_step.resolve_device("cuda:1", current_cuda=lambda: 3) == torch.device("cuda", 1)
    assert gpu_step.resolve_device("cpu") == torch.device("cpu")


def test_gpu_step_sweeps_batches_counts_compiles_profiles_and_keeps_to_its_budget(tmp_path):
    from benchmarks import gpu_step

    argv = ["spikformer_v2_tiny", "--mode", "finetune", "--img", "32", "--batch", "2", "3", "--steps", "1",
            "--warmup", "1", "--precision", "fp32", "--device", "cpu", "--compile", "--compile-backend", "eager",
            "--profile-steps", "1", "--json", str(tmp_path / "step.json")]
    result = gpu_step.main(argv)
    assert [r["batch"] for r in result["rows"]] == [2, 3] and not result["skipped"]
    fastest = max(result["rows"], key=lambda r: r["images_per_s"])
    assert result["best"] == {"finetune": {"batch": fastest["batch"], "images_per_s": fastest["images_per_s"],
                                           "mfu": fastest["mfu"]}}
    for row in result["rows"]:  # counted per run: each batch is its own compilation, none a recompile
        assert {k: row["dynamo"][k] for k in ("graphs", "graph_breaks", "recompiles")} == \
            {"graphs": 1, "graph_breaks": 0, "recompiles": 0}
        shares = [k["share"] for k in row["profile"]]
        assert 0 < len(shares) <= 15 and shares == sorted(shares, reverse=True) and sum(shares) <= 1.0 + 1e-9
    assert json.loads((tmp_path / "step.json").read_text())["best"] == result["best"]

    # a budget the first run uses up: the second is skipped and said so (eager: quicker)
    eager = [a for a in argv[:-2] if a not in ("--compile", "--compile-backend", "eager")]
    result = gpu_step.main([*eager, "--budget-s", "0.01"])
    assert [r["batch"] for r in result["rows"]] == [2]
    assert result["skipped"] == [{"mode": "finetune", "batch": 3, "why": result["skipped"][0]["why"]}]
    assert result["skipped"][0]["why"].startswith("time:")


def test_gpu_step_recompile_count_sees_a_recompilation():
    from benchmarks import gpu_step

    gpu_step.reset_dynamo()
    scale = torch.compile(lambda x, k: x * k, backend="eager", dynamic=False)
    scale(torch.ones(2), 2)
    assert gpu_step.dynamo_counts()["recompiles"] == 0
    scale(torch.ones(3), 2)  # a new static shape: the same frame compiled again
    assert gpu_step.dynamo_counts()["recompiles"] == 1
    gpu_step.reset_dynamo()


def _states(stdout: str) -> dict[str, str]:
    return dict(line.split()[1:] for line in stdout.splitlines() if line.startswith("STATE "))


def _junit(path: Path, tests: int, failures: int = 0, skipped: int = 0) -> str:
    path.write_text(f'<testsuites><testsuite tests="{tests}" failures="{failures}" errors="0" '
                    f'skipped="{skipped}"/></testsuites>')
    return str(path)


@pytest.mark.parametrize(("rc", "junit", "no_skips", "status"), [
    (0, (3, 0, 0), False, "passed"),
    (0, (3, 0, 3), False, "FAILED"),  # nothing passed: every test skipped
    (0, (3, 0, 1), True, "FAILED"),  # a skipped CUDA test on the GPU is no check
    (1, (3, 1, 0), False, "FAILED"),
    (124, None, False, "timeout"),
])
def test_step_record_status(tmp_path, rc, junit, no_skips, status):
    argv = ["step", "--name", "x", "--rc", str(rc), "--seconds", "1", "--limit", "9", "--out", str(tmp_path / "x.json")]
    if junit:
        argv += ["--junit", _junit(tmp_path / "j.xml", *junit)]
    if no_skips:
        argv.append("--no-skips")
    assert gpu_report.main(argv) == 0
    assert json.loads((tmp_path / "x.json").read_text())["status"] == status


def test_step_record_fails_without_its_result_and_summary_fails_with_it(tmp_path):
    gpu_report.main(["step", "--name", "a", "--rc", "0", "--seconds", "1", "--limit", "9", "--out",
                     str(tmp_path / "a.json")])
    gpu_report.main(["step", "--name", "b", "--rc", "0", "--seconds", "1", "--limit", "9", "--out",
                     str(tmp_path / "b.json"), "--result", str(tmp_path / "missing.json")])
    assert json.loads((tmp_path / "b.json").read_text())["status"] == "FAILED"
    assert gpu_report.main(["summary", "--dir", str(tmp_path), "--steps", "a"]) == 0
    assert gpu_report.main(["summary", "--dir", str(tmp_path), "--steps", "a,b,c"]) == 1  # c wrote no record
    assert "- result: FAILED: b, c" in (tmp_path / "summary.md").read_text()


WHEELS = REPO / ".whl"


@pytest.mark.skipif(not any(WHEELS.glob("*.whl")), reason="no .whl/: run benchmarks/gpu_wheels.sh first")
@pytest.mark.timeout(300)
def test_carried_wheels_resolve_offline_and_a_missing_one_is_caught(tmp_path, monkeypatch):
    from benchmarks import gpu_wheels_check

    assert gpu_wheels_check.main(["--wheels", str(WHEELS)]) == 0
    partial = tmp_path / "whl"
    partial.mkdir()
    for wheel in WHEELS.glob("*.whl"):
        if not wheel.name.startswith("hjson-"):
            shutil.copy(wheel, partial)
    with pytest.raises(SystemExit, match="no wheel for hjson"):
        gpu_wheels_check.main(["--wheels", str(partial)])
    # even when the list forgets it, the resolver finds the hole (DeepSpeed needs hjson)
    monkeypatch.setattr(gpu_wheels_check, "CARRIED", tuple(n for n in gpu_wheels_check.CARRIED if n != "hjson"))
    with pytest.raises(SystemExit, match="hjson"):
        gpu_wheels_check.main(["--wheels", str(partial)])
