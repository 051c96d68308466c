"""What a spec names is checked before any work: one line naming the key, exit 2, no shards, no Ray.

Before this check, `--set model.variant=spikformer_v3` made `plan` die with timm's RuntimeError
traceback, and `run` wrote shards, started Ray and launched trainers that failed (and retried).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_job
from pipeline.errors import PipelineError
from pipeline.runner.preflight import check_job, check_model, check_variant

REPO = Path(__file__).resolve().parents[2]
ALL = ["pretrain", "probe", "finetune", "evaluate"]

pytestmark = pytest.mark.timeout(600)


def cli(command: str, tmp: Path, *sets: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m pipeline <command> jobs/quickstart.yaml` with outputs and MLflow in tmp (no Ray address)."""
    words = [f"output_root={tmp}/out", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline", command, "jobs/quickstart.yaml",
                           *[w for s in words for w in ("--set", s)]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return done, time.monotonic() - started


def the_error(done: subprocess.CompletedProcess) -> str:
    """The one `error:` line; no traceback anywhere."""
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-4000:]
    return errors[0]


def written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def quickstart(*sets: str):
    return load_job(REPO / "jobs" / "quickstart.yaml", list(sets))


# --------------------------------------------------------------------------- through the CLI


def test_plan_names_the_unknown_variant_with_a_suggestion(tmp_path):
    done, seconds = cli("plan", tmp_path, "model.variant=spikformer_v3")
    line = the_error(done)
    assert line.startswith("error: model.variant: 'spikformer_v3' is not a registered Spikformer variant")
    assert line.endswith("?") and "did you mean 'spikformer_v2_" in line, line
    print(f"plan refused in {seconds:.1f}s")
    # control: the right name plans (the check does not refuse everything)
    from pipeline.runner.plan import plan_job

    planned = plan_job(quickstart(f"output_root={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"))
    assert [p.stage for p in planned][:1] == ["pretrain"]


def test_run_stops_before_shards_and_ray(tmp_path):
    done, seconds = cli("run", tmp_path, "model.variant=spikformer_v3")
    line = the_error(done)
    assert line.startswith("error: model.variant: 'spikformer_v3'") and "did you mean" in line
    output = done.stdout + done.stderr
    assert written(tmp_path / "out") == ["logs/quickstart-driver.log"]  # no shards, no Ray storage
    assert "starting a local Ray" not in output and "connecting to the Ray" not in output, output[-3000:]
    print(f"run refused in {seconds:.1f}s")


def test_run_refuses_a_missing_manifest_before_building_the_others(tmp_path):
    missing = tmp_path / "elsewhere" / "train.manifest.json"
    done, _ = cli("run", tmp_path, f"data.train={missing}")
    assert the_error(done) == f"error: data.train: {missing}: manifest not found"
    assert written(tmp_path / "out") == ["logs/quickstart-driver.log"]  # data.build would have written val


# --------------------------------------------------------------------------- the model


def test_a_wrong_kwarg_is_one_line_naming_model_kwargs():
    with pytest.raises(PipelineError) as err:
        check_job(quickstart("model.kwargs={embed_dimm: 64}"), ALL)
    assert str(err.value).startswith("model.kwargs: spikformer_v2_tiny with {'embed_dimm': 64} (stage pretrain): ")
    assert "unexpected keyword argument 'embed_dimm'" in str(err.value)
    with pytest.raises(PipelineError, match=r"^model.kwargs: .*\{'depth': -1\}"):  # torch's own RuntimeError
        check_job(quickstart("model.kwargs={depth: -1}"), ALL)


def test_shipped_specs_pass_the_model_checks_on_the_meta_device():
    """Control: every model the repository's specs name builds for each of their stages, in no memory."""
    env = {"OUTPUT_ROOT": "/tmp/unused", "SHARDS": "/tmp/unused", "MLFLOW_TRACKING_URI": "http://unused:5000"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        specs = [p for p in sorted((REPO / "jobs").glob("*.yaml")) if "stages" in p.read_text()]
        checked = set()
        for path in specs:
            job = load_job(path, [])
            check_variant(job)
            for stage in ALL:
                check_model(job, stage)
            checked.add(job.model.variant)
        assert "spikformer_v2_16_768" in checked and "spikformer_v2_tiny" in checked, checked
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert not any(p.is_meta for p in torch.nn.Linear(2, 2).parameters())  # the meta device did not leak


# --------------------------------------------------------------------------- manifests and exports


def test_a_manifest_that_does_not_parse_is_named_by_its_key(tmp_path):
    broken = tmp_path / "val.manifest.json"
    broken.write_text("{not json")
    with pytest.raises(PipelineError, match=rf"^data.val: {broken}: manifest is not valid JSON"):
        check_job(quickstart(f"data.val={broken}"), ALL)
    # control: the manifests data.build will write are not looked for (they do not exist yet)
    own = quickstart(f"output_root={tmp_path}/out", f"data.train={tmp_path}/out/shards/train.manifest.json")
    check_job(own, ALL)


def test_an_init_url_that_is_not_an_export_is_refused(tmp_path):
    from pipeline.train.export import write_export

    with pytest.raises(PipelineError, match=r"^stages.finetune.init: .*/nothing: .*not found"):
        check_job(quickstart(f"stages.finetune.init={tmp_path}/nothing"), ALL)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"format": "someone-elses/2"}))
    with pytest.raises(PipelineError, match=r"^stages.finetune.init: .*format is 'someone-elses/2'"):
        check_job(quickstart(f"stages.finetune.init={other}"), ALL)
    # control: a real export passes
    write_export({"w": torch.zeros(2)}, {"variant": "spikformer_v2_tiny", "kwargs": {}}, str(tmp_path / "export"))
    check_job(quickstart(f"stages.finetune.init={tmp_path}/export"), ALL)


def test_references_are_resolved_when_a_tracker_is_given(tmp_path):
    from pipeline import tracking

    job = quickstart(f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                     "stages.evaluate.export=runs:/0123abcd/export")
    check_job(job, ALL)  # control: without the store a reference cannot be judged, so it is left to resolution
    tracker = tracking.prepare(job.mlflow)
    with pytest.raises(PipelineError, match=r"^stages.evaluate.export: runs:/0123abcd/export: no run 0123abcd"):
        check_job(job, ALL, tracker)
