"""Records never vanish: a driver inside a Ray job's working directory refuses relative record locations,
and `submit` to a head on this machine passes absolute ones.

`ray job submit --working-dir . -- python -m pipeline run jobs/quickstart.yaml` used to succeed with its
MLflow store and outputs inside `/tmp/ray/session_*/runtime_resources/working_dir_files/_ray_pkg_*`,
which Ray deletes. What Ray 2.60 gives such a driver (checked on a real head, `ray start --head`):
its cwd is that folder, and RAY_JOB_CONFIG_JSON_ENV_VAR holds the job's runtime_env with the uploaded
`working_dir` (`gcs://_ray_pkg_<hash>.zip`). The guard's test copies both, through the real CLI;
tests/orchestrate/test_ray_job.py submits to a real head with absolute locations, which pass it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.__main__ import build_parser
from pipeline.commands._job_args import load
from pipeline.commands.submit import entrypoint, is_this_machine
from pipeline.config import load_job
from pipeline.errors import PipelineError
from pipeline.runner.preflight import RAY_JOB_ENV, check_records_location, ray_job_working_dir, relative_locations

REPO = Path(__file__).resolve().parents[2]
PKG = "_ray_pkg_3396f5646efadb09"
RAY_JOB_CONFIG = json.dumps({"runtime_env": {"working_dir": f"gcs://{PKG}.zip", "env_vars": {}},
                             "metadata": {"job_submission_id": "raysubmit_test", "job_name": "raysubmit_test"}})

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def ray_job_dir(tmp_path) -> Path:
    """A folder named and filled as Ray's copy of the submitted working directory."""
    folder = tmp_path / "session_2026-12-01_16-04-37_492731_1" / "runtime_resources" / "working_dir_files" / PKG
    (folder / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "quickstart.yaml", folder / "jobs" / "quickstart.yaml")
    return folder


WITHOUT_GUARD = ("import sys, pipeline.runner.preflight as p; p.check_records_location = lambda *a, **k: None; "
                 "from pipeline.__main__ import main; sys.exit(main())")


def run_in(folder: Path, *sets: str, guard: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, RAY_JOB_ENV: RAY_JOB_CONFIG, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    python = [sys.executable, "-m", "pipeline"] if guard else [sys.executable, "-c", WITHOUT_GUARD]
    return subprocess.run([*python, "run", "jobs/quickstart.yaml", *[w for s in sets for w in ("--set", s)]],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_driver_in_a_ray_working_dir_refuses_relative_records(ray_job_dir, tmp_path):
    done = run_in(ray_job_dir)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output[-4000:]
    [line] = [line for line in output.splitlines() if line.startswith("error:")]
    assert f"working directory ({ray_job_dir})" in line, line
    assert "mlflow.tracking_uri=sqlite:///mlflow.db" in line and "output_root=outputs/quickstart" in line, line
    assert "--set mlflow.tracking_uri=" in line and "--set output_root=" in line, line
    assert files_in(ray_job_dir) == ["jobs/quickstart.yaml"]  # no mlflow.db, no outputs, no log

    # control: absolute locations pass the guard (the run then stops at the next check, the model name,
    # so nothing trains here)
    keep = tmp_path / "kept"
    done = run_in(ray_job_dir, f"output_root={keep}/out", f"mlflow.tracking_uri=sqlite:///{keep}/mlflow.db",
                  "model.variant=spikformer_v3")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-4000:]
    assert [line for line in output.splitlines() if line.startswith("error:")][0].startswith(
        "error: model.variant: 'spikformer_v3'"), output[-3000:]
    assert files_in(ray_job_dir) == ["jobs/quickstart.yaml"]
    assert (keep / "mlflow.db").exists()

    # control: without the guard the same driver writes its records into Ray's folder (stopped by the
    # model check right after the MLflow store was created)
    done = run_in(ray_job_dir, "model.variant=spikformer_v3", guard=False)
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    assert "mlflow.db" in files_in(ray_job_dir) and "outputs/quickstart/logs/quickstart-driver.log" in \
        files_in(ray_job_dir), files_in(ray_job_dir)


def test_ray_job_detection(tmp_path, ray_job_dir):
    plain = str(tmp_path)
    assert ray_job_working_dir(str(ray_job_dir), env={}) == str(ray_job_dir)  # by the folder alone
    assert ray_job_working_dir(plain, env={RAY_JOB_ENV: RAY_JOB_CONFIG}) == plain  # by Ray's job env alone
    assert ray_job_working_dir(plain, env={}) is None
    no_upload = json.dumps({"runtime_env": {}, "metadata": {}})  # a job submitted without --working-dir
    assert ray_job_working_dir(plain, env={RAY_JOB_ENV: no_upload}) is None
    job = load_job(REPO / "jobs" / "quickstart.yaml", [])
    check_records_location(job, cwd=plain, env={})  # relative, but not in a Ray job: fine
    with pytest.raises(PipelineError, match="output_root=outputs/quickstart"):
        check_records_location(job, cwd=plain, env={RAY_JOB_ENV: RAY_JOB_CONFIG})


@pytest.mark.parametrize(("uri", "relative"), [
    (None, True),  # the default sqlite:///mlflow.db
    ("sqlite:///runs/mlflow.db", True),
    ("sqlite:////srv/mlflow/mlflow.db", False),
    ("mlruns", True),
    ("file:./mlruns", True),
    ("file:///srv/mlruns", False),
    ("http://mlflow:5000", False),
    ("postgresql://mlflow@db/mlflow", False),
])
def test_relative_tracking_stores(uri, relative):
    sets = ["output_root=s3://bucket/runs"] + ([f"mlflow.tracking_uri={uri}"] if uri else [])
    found = relative_locations(load_job(REPO / "jobs" / "quickstart.yaml", sets), env={})
    assert ("mlflow.tracking_uri" in found) == relative, found
    assert "output_root" not in found


def test_relative_locations_reads_mlflow_env_and_build_dest():
    job = load_job(REPO / "jobs" / "quickstart.yaml", ["data.build.dest=shards/digits"])
    found = relative_locations(job, env={"MLFLOW_TRACKING_URI": "sqlite:///x.db"})
    assert found == {"mlflow.tracking_uri": "sqlite:///x.db", "output_root": "outputs/quickstart",
                     "data.build.dest": "shards/digits"}
    assert relative_locations(job, env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}).keys() == \
        {"output_root", "data.build.dest"}


# --------------------------------------------------------------------------- submit's entrypoint


def submit_args(address: str, *sets: str):
    args = build_parser().parse_args(["submit", "jobs/quickstart.yaml", "--address", address,
                                      *[w for s in sets for w in ("--set", s)]])
    job, _ = load(args)
    return args, job


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "localhost:6379", "ray://localhost:10001", "auto"])
def test_submit_to_a_local_head_passes_absolute_locations(address, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args, job = submit_args(address, "stages.finetune.epochs=2")
    command = entrypoint(args, job, address, cwd=str(REPO), env={})
    words = shlex.split(command)
    assert words[:5] == ["python", "-m", "pipeline", "run", "jobs/quickstart.yaml"]
    assert words[5:7] == ["--set", "stages.finetune.epochs=2"]  # the user's overrides first
    assert f"output_root={REPO}/outputs/quickstart" in words
    assert f"mlflow.tracking_uri=sqlite:///{REPO}/mlflow.db" in words
    # what the driver will load, from Ray's copy of the folder: the same absolute places, and the guard passes
    monkeypatch.chdir(tmp_path)
    driver = build_parser().parse_args(words[3:])
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    driven, _ = load(driver)
    assert driven.output_root == f"{REPO}/outputs/quickstart"
    assert driven.mlflow.tracking_uri == f"sqlite:///{REPO}/mlflow.db"
    check_records_location(driven, cwd=str(tmp_path), env={RAY_JOB_ENV: RAY_JOB_CONFIG})


def test_submit_resolves_a_relative_override_and_keeps_absolute_ones(monkeypatch):
    monkeypatch.chdir(REPO)
    args, job = submit_args("http://127.0.0.1:8265", "output_root=runs/mine", "mlflow.tracking_uri=http://mlflow:5000")
    words = shlex.split(entrypoint(args, job, "http://127.0.0.1:8265", cwd="/home/me/project", env={}))
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert sets == ["output_root=runs/mine", "mlflow.tracking_uri=http://mlflow:5000",
                    "output_root=/home/me/project/runs/mine"]  # the last --set of a key wins
    # control: nothing relative, nothing added
    args, job = submit_args("http://127.0.0.1:8265", "output_root=s3://b/runs", "mlflow.tracking_uri=http://m:5000")
    assert shlex.split(entrypoint(args, job, "http://127.0.0.1:8265", env={}))[5:] == \
        ["--set", "output_root=s3://b/runs", "--set", "mlflow.tracking_uri=http://m:5000"]


def test_submit_to_a_remote_head_refuses_relative_locations():
    assert not is_this_machine("http://10.255.3.4:8265")
    args, job = submit_args("http://10.255.3.4:8265")
    with pytest.raises(PipelineError, match=r"^mlflow.tracking_uri=sqlite:///mlflow.db, output_root=outputs/quick"):
        entrypoint(args, job, "http://10.255.3.4:8265", env={})
    args, job = submit_args("http://10.255.3.4:8265", "output_root=s3://b/runs", "mlflow.tracking_uri=http://m:5000")
    entrypoint(args, job, "http://10.255.3.4:8265", env={})  # control: shared locations go through


def test_submit_cli_refuses_before_connecting():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "pipeline", "submit", "jobs/quickstart.yaml", "--address",
                           "http://10.255.3.4:8265"], cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "output_root=outputs/quickstart" in line and "Ray's temporary working directory" in line, line
    assert "submission to" not in done.stderr  # refused here, not a failed connection
