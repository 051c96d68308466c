"""A full disk during a stage's checkpoint, as a person sees it (issue 23, item 6): the real CLI
(`python -m pipeline local`, one process) with its output_root on a 5 MB tmpfs prints exactly one
`error:` line naming the file, what a tag needs and what is free, no traceback, exit 2 (it was a
62-line traceback ending in `inline_container.cc:672] unexpected pos`, exit 1). Skipped where this
user cannot mount a tmpfs (the engine-level file-size-limit cases in test_checkpoint_disk_full.py
run everywhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
import stage_helpers  # noqa: E402  (tests/stages helpers: the small job spec)

from pipeline.data.writer import write_shards  # noqa: E402
from pipeline.train.checkpoint import read_latest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_a_full_disk_during_a_checkpoint_is_one_error_line(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(outputs)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        shards = {split: write_shards("digits", str(tmp_path / "shards"), split=split, shard_max_count=500, workers=0,
                                      progress=False).manifest_url for split in ("train", "val")}
        job = stage_helpers.make_job(shards, **{
            "stages.finetune.init": "scratch", "stages.finetune.max_steps": 6,
            "stages.finetune.checkpoint": {"every_steps": 2, "keep_last": 2},
            "output_root": str(outputs), "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
        spec = tmp_path / "job.yaml"
        spec.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        done = subprocess.run([sys.executable, "-m", "pipeline", "local", str(spec), "--stages", "finetune"],
                              cwd=REPO, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                              timeout=600)
        output = done.stdout + done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and len(errors) == 1, output[-4000:]
        assert "Traceback" not in output and "inline_container" not in output, output[-4000:]
        line = errors[0]
        assert "not saved, the storage is full: rank 0 could not write " in line, line
        assert "No space left on device after " in line and "a whole tag needs about" in line, line
        assert " free there. The unfinished tag was removed; `latest` still names step00000002" in line, line
        checkpoints = next(outputs.glob("finetune-*")) / "work" / "checkpoints"
        assert read_latest(checkpoints) == "step00000002"
        assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step00000002"]
    finally:
        subprocess.run(["umount", "-l", str(outputs)], check=False)
