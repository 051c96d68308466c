"""Where the console promises one line, one line: each case runs the real CLI (`python -m pipeline ...`)
and reads what a person sees: exactly one `error:` line naming the key, file or input at fault, no
traceback, exit 2.

- `epochs: .inf` / `.nan` are refused when the spec is validated (they passed `gt=0` and overflowed
  later in plan and run);
- an `output_root` that is a file is named before anything is written (it was a NotADirectoryError
  traceback from the log file);
- `plan` lists every input it could not check, a `job:` reference included, while another input is
  unreadable too (it exited 0 without naming the reference);
- a label outside the classes during finetuning names the shard and the sample (it was torch's
  `index 9 is out of bounds` from inside the loss).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.writer import write_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
import stage_helpers  # noqa: E402  (tests/stages helpers: the small job spec)

REPO = Path(__file__).resolve().parents[2]


def cli(*words: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "pipeline", *words], cwd=cwd, capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=timeout)


def the_error(done: subprocess.CompletedProcess) -> str:
    """The one `error:` line; the command exited 2 and printed no traceback."""
    output = done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return errors[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    dest = tmp_path_factory.mktemp("one-line-shards")
    return {split: write_shards("digits", str(dest), split=split, shard_max_count=500, workers=0,
                                progress=False).manifest_url for split in ("train", "val")}


def quickstart_sets(tmp_path: Path, shards: dict[str, str]) -> list[str]:
    sets = [f"output_root={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "data.build=null",
            f"data.train={shards['train']}", f"data.val={shards['val']}"]
    return [w for s in sets for w in ("--set", s)]


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_a_non_finite_epoch_count_is_refused_naming_the_key(value, tmp_path, shards):
    done = cli("plan", "jobs/quickstart.yaml", *quickstart_sets(tmp_path, shards),
               "--set", f"stages.finetune.epochs={value}")
    line = the_error(done)
    assert line.startswith("error: jobs/quickstart.yaml: stages.finetune.epochs: Input should be a finite number"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["run", "local"])
def test_an_output_root_that_is_a_file_is_one_line(command, tmp_path, shards):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the outputs should go\n")
    sets = [*quickstart_sets(tmp_path, shards), "--set", f"output_root={blocker}"]
    line = the_error(cli(command, "jobs/quickstart.yaml", *sets))
    assert line == f"error: output_root: {blocker}: is a file, not a folder"
    beneath = blocker / "sub"  # a file above the folder: NotADirectoryError before
    line = the_error(cli(command, "jobs/quickstart.yaml", *[*sets, "--set", f"output_root={beneath}"]))
    assert line.startswith(f"error: output_root: {beneath}: cannot create it: "), line
    assert blocker.read_text() == "a file where the outputs should go\n"


def test_plan_lists_every_input_it_could_not_check(tmp_path, shards):
    missing_val = tmp_path / "gone" / "val.manifest.json"
    sets = [*quickstart_sets(tmp_path, shards), "--set", f"data.val={missing_val}",
            "--set", "stages.finetune.init=job:no-such-job"]
    done = cli("plan", "jobs/quickstart.yaml", *sets, "--no-costs")
    line = the_error(done)
    assert line.startswith("error: plan printed, but 2 input(s) could not be checked: "), line
    assert f"data.val: {missing_val}: manifest not found" in line
    assert "stages.finetune.init: job:no-such-job: no FINISHED pretrain run of job 'no-such-job'" in line, line
    assert "  finetune " in done.stdout and "  pretrain " in done.stdout  # the plan itself was printed

    # controls, in this process (the CLI's start-up is the slow part): the reference alone is listed
    # too, and a spec whose inputs all exist plans with nothing unchecked
    from pipeline.config import load_job
    from pipeline.runner.plan import plan_job

    def unchecked(*extra: str) -> list[str]:
        found: list[str] = []
        sets = [w for w in quickstart_sets(tmp_path, shards) if w != "--set"]
        plan_job(load_job(REPO / "jobs" / "quickstart.yaml", [*sets, *extra]), None, found)
        return found

    (alone,) = unchecked("stages.finetune.init=job:no-such-job")
    assert alone.startswith("stages.finetune.init: job:no-such-job: no FINISHED pretrain run"), alone
    assert unchecked() == []

    # a sweep lists each input once, with the first cell that needs it (here every cell does)
    from pipeline.runner.sweep import plan_sweep

    sweep = {"seeds": 2, "cells": [{"name": "a"}, {"name": "b", "set": {"stages.finetune.epochs": 2}}]}
    sets = [w for w in quickstart_sets(tmp_path, shards) if w != "--set"]
    found: list[str] = []
    job = load_job(REPO / "jobs" / "quickstart.yaml", [*sets, "stages.finetune.init=job:no-such-job",
                                                       f"sweep={json.dumps(sweep)}"])
    assert len(plan_sweep(job, None, found)) == 4
    (listed,) = found
    assert listed.startswith("cell a seed 0: stages.finetune.init: job:no-such-job: no FINISHED pretrain"), listed


def test_a_label_outside_the_classes_names_the_shard_and_sample(tmp_path, shards):
    """The train manifest lists 8 classes but its shards hold digits 8 and 9; model.num_classes is 8."""
    manifest = json.loads(Path(shards["train"]).read_text())
    manifest["classes"] = manifest["classes"][:8]
    narrowed = tmp_path / "train.manifest.json"
    shard_dir = Path(shards["train"]).parent
    manifest["shards"] = [{**entry, "url": str(shard_dir / entry["url"])} for entry in manifest["shards"]]
    narrowed.write_text(json.dumps(manifest))
    job = stage_helpers.make_job({"train": str(narrowed), "val": shards["val"]}, **{
        "data.loader_workers": 1, "model.num_classes": 8, "stages.finetune.init": "scratch",
        "stages.finetune.max_steps": 4, "output_root": str(tmp_path / "outputs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(job))
    started = time.monotonic()
    line = the_error(cli("local", str(spec), "--stages", "finetune"))
    print(f"refused in {time.monotonic() - started:.0f}s")
    assert line.startswith(f"error: {shard_dir}/train-0000"), line
    assert ": label 8 is outside the manifest's 8 classes (0..7)" in line or \
        ": label 9 is outside the manifest's 8 classes (0..7)" in line, line
    assert "sample '" in line and "out of bounds" not in line
