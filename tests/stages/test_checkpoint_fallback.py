"""A stage killed after its step-8 checkpoint, whose step-8 tag then gets flipped bits (issue 23, item 1):
the re-run names the bad file, resumes from the step-4 tag, says so on the console and as the MLflow tag
`pipeline.checkpoint_fallback` of the same stage run, and finishes.

Two launches through the real runner (torchrun, 2 CPU ranks, gloo, sqlite MLflow store).
"""

from __future__ import annotations

import pytest
from stage_helpers import Records, launch, make_job, trace

from pipeline.train.trainer import FALLBACK_TAG

pytestmark = pytest.mark.slow

STEPS, EVERY, KILL_AT = 12, 4, 10
MODEL = "mp_rank_00_model_states.pt"


def test_a_corrupt_latest_tag_falls_back_to_the_previous_one_and_the_run_says_so(digits_shards, tmp_path):
    job = make_job(digits_shards, **{
        "stages.finetune.init": "scratch", "stages.finetune.max_steps": STEPS,
        "stages.finetune.checkpoint": {"every_steps": EVERY, "keep_last": 2},
    })
    launch(tmp_path, job, "finetune", expect_rc=1, fault=f"finetune:0:{KILL_AT}")
    records = Records(tmp_path)
    run_id = records.runs("finetune")[0].info.run_id
    folder = tmp_path / "outputs" / f"finetune-{records.runs('finetune')[0].data.tags['fingerprint'][:12]}"
    checkpoints = folder / "work" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000008"
    bad = checkpoints / "step00000008" / MODEL
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, size unchanged
    bad.write_bytes(bytes(data))
    (tmp_path / "trace-rank0.jsonl").unlink()

    proc = launch(tmp_path, job, "finetune")
    steps = [r["step"] for r in trace(tmp_path, "finetune")]
    assert steps == list(range(EVERY + 1, STEPS + 1))  # continued after step 4, not 8
    console = proc.stdout + proc.stderr
    assert f"step00000008 is not usable: {MODEL}: sha256" in console
    assert "resuming from" in console and "step00000004, the newest checkpoint that verifies" in console
    run = records.run("finetune")
    assert run.info.run_id == run_id  # the same stage run, continued
    note = run.data.tags[FALLBACK_TAG]
    assert note.startswith("resumed from step00000004") and f"step00000008: {MODEL}: sha256" in note
