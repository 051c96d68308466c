"""End to end through `ray job submit`: the quickstart job, scaled down, on a real Ray head.

One submitted run proves three things at once, to keep the suite short:
- the job succeeds and MLflow holds evaluate -> finetune -> pretrain -> dataset manifest;
- a finetune worker killed at step 3 (test hook) is restarted by Ray Train and the stage resumes
  from its last checkpoint: the step counter continues and each final metric is logged once;
then two more runs of the same spec prove stage caching.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(1500)

KILL_STEP, CKPT_EVERY, FT_STEPS = 3, 2, 6


def overrides(tmp: str) -> list[str]:
    sets = [
        f"output_root={tmp}/out",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "stages.pretrain.max_steps=4",
        "stages.pretrain.log_every_steps=2",
        f"stages.finetune.max_steps={FT_STEPS}",
        "stages.finetune.log_every_steps=1",
        f"stages.finetune.checkpoint.every_steps={CKPT_EVERY}",
        "stages.finetune.batch_size=32",
        "stages.pretrain.batch_size=32",
    ]
    return [word for s in sets for word in ("--set", s)]


def fault_runtime_env() -> list[str]:
    """The test fault hook travels as an environment variable of the Ray job (not in the job spec)."""
    return ["--runtime-env-json", json.dumps({"env_vars": {"PIPELINE_TEST_FAULT": f"finetune:1:{KILL_STEP}"}})]


def run_cli(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "python"), "-m", "pipeline", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitted(ray_head, tmp_path_factory):
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, dashboard, env = ray_head
    tmp = str(tmp_path_factory.mktemp("rayjob"))
    entry = ["python", "-m", "pipeline", "run", "jobs/quickstart.yaml", *overrides(tmp)]
    submit = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--no-wait",
                             "--working-dir", ".", *fault_runtime_env(), "--", *entry],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = next(line.split("'")[1] for line in submit.stdout.splitlines() if "submitted successfully" in line)
    client = JobSubmissionClient(dashboard)
    deadline = time.time() + 1200
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(5)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    return tmp, logs


def runs_by_stage(tmp: str) -> dict[str, list]:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("spikformer-quickstart")
    by_stage: dict[str, list] = {}
    if experiment is None:  # the driver has not created it yet
        return by_stage
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        by_stage.setdefault(run.data.tags.get("pipeline.stage", "job"), []).append(run)
    return by_stage


def test_job_succeeds_and_mlflow_holds_the_lineage_chain(submitted):
    tmp, logs = submitted
    assert "top-1 accuracy" in logs and "mlflow ui --backend-store-uri" in logs
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    evaluate = runs_by_stage(tmp)["evaluate"][-1]
    from pipeline.lineage import walk
    from pipeline.tracking import STAGE_TAG

    chain = walk(client, evaluate.info.run_id, STAGE_TAG)
    assert [link.stage for link in chain] == ["evaluate", "finetune", "pretrain"]
    (shards,) = Path(f"{tmp}/out/shards").glob("digits-*")  # the build's fingerprint names the folder
    train_manifest = load_manifest(f"{shards}/train.manifest.json")
    assert chain[-1].dataset_digest == train_manifest.digest
    assert chain[-1].dataset_url.endswith("train.manifest.json")
    assert evaluate.data.metrics["n_samples"] == load_manifest(f"{shards}/val.manifest.json").num_samples
    finetune = client.get_run(chain[1].run_id)
    assert finetune.data.tags["pipeline.registered_model"].startswith("spikformer-v2-digits/")
    assert finetune.info.status == "FINISHED"


def test_killed_worker_resumes_from_checkpoint_without_restarting_the_step_counter(submitted):
    tmp, logs = submitted
    fired = list(Path(f"{tmp}/out/ray").glob("*/.fault-fired"))
    assert fired, "the fault hook never fired"
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    finetune = runs_by_stage(tmp)["finetune"][-1]
    # a new worker group (attempt 2) resumed from the last checkpoint; the steps it recomputed are
    # not logged twice: every step once, in order
    assert finetune.data.tags["pipeline.attempts"] == "2"
    steps = [m.step for m in client.get_metric_history(finetune.info.run_id, "loss")]
    assert steps == list(range(1, FT_STEPS + 1)), steps
    assert "attempt 1 failed" in logs and "retrying from the last checkpoint" in logs
    for key in ("final_loss", "steps"):
        assert len(client.get_metric_history(finetune.info.run_id, key)) == 1, key
    assert finetune.data.metrics["steps"] == FT_STEPS


def test_storage_keeps_the_last_checkpoints_and_no_scratch_is_left(submitted):
    tmp, _ = submitted
    finetune = runs_by_stage(tmp)["finetune"][-1]
    trial = next(Path(f"{tmp}/out/ray").glob(f"*-finetune-{finetune.data.tags['fingerprint'][:12]}"))
    kept = sorted(p.name for p in trial.glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2, kept  # keep_last 2 of the 3 reported (steps 2, 4 and the final 6)
    leftovers = list(Path(tempfile.gettempdir()).glob(f"{trial.name}-rank*"))
    assert leftovers == [], leftovers


def test_rerun_skips_every_stage_and_a_finetune_change_reruns_only_downstream(submitted, ray_head):
    from ray.job_submission import JobSubmissionClient

    tmp, _ = submitted
    gcs, dashboard, env = ray_head
    # the same job again, through `python -m pipeline submit` (the Ray job SDK): every stage is reused
    again = run_cli(["submit", "jobs/quickstart.yaml", "--address", dashboard, "--wait", *overrides(tmp)], env)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    job_id = next(line.split()[3] for line in again.stdout.splitlines() if line.startswith("submitted Ray job"))
    logs = JobSubmissionClient(dashboard).get_job_logs(job_id)
    for stage in ("pretrain", "finetune", "evaluate"):
        assert any(line.split()[:2] == [stage, "reused"] for line in logs.splitlines()), logs[-3000:]

    env = {**env, "RAY_ADDRESS": gcs}

    changed = run_cli(["run", "jobs/quickstart.yaml", *overrides(tmp), "--set", "stages.finetune.label_smoothing=0.2"],
                      env)
    assert changed.returncode == 0, changed.stderr[-4000:]
    states = {line.split()[0]: line.split()[1] for line in changed.stdout.splitlines()
              if line.split()[:1] in (["pretrain"], ["finetune"], ["evaluate"])}
    assert states == {"pretrain": "reused", "finetune": "ran", "evaluate": "ran"}, changed.stdout


@pytest.mark.slow
def test_ray_job_stop_ends_the_runs_killed(ray_head, tmp_path):
    """`ray job stop` sends the driver SIGTERM: the job run and the running stage run end KILLED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, dashboard, env = ray_head
    sets = [*overrides(str(tmp_path)), "--set", "stages.pretrain.enabled=false", "--set", "stages.probe.enabled=false",
            "--set",
            "stages.finetune.init=scratch", "--set", "stages.finetune.max_steps=2000"]
    client = JobSubmissionClient(dashboard)
    entry = shlex.join(["python", "-m", "pipeline", "run", "jobs/quickstart.yaml", *sets])
    job_id = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(REPO)})
    store = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.time() + 600
    while time.time() < deadline:  # until the finetune stage has logged a few steps
        found = runs_by_stage(str(tmp_path)) if (tmp_path / "mlflow.db").exists() else {}
        if "finetune" in found and store.get_metric_history(found["finetune"][-1].info.run_id, "loss"):
            break
        assert client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job_id)
        time.sleep(2)
    client.stop_job(job_id)
    while client.get_job_status(job_id) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        time.sleep(1)
    found = runs_by_stage(str(tmp_path))
    assert found["job"][-1].info.status == "KILLED", client.get_job_logs(job_id)[-3000:]
    assert found["finetune"][-1].info.status == "KILLED"
