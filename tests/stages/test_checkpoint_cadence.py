"""Every training stage gets a resume point before it ends: checkpoint.every_minutes beside every_steps,
and the quickstart's cadence (its pretraining used to end at step 184 with every_steps 200: no resume
point at all)."""

from __future__ import annotations

from pathlib import Path

from stage_helpers import Records, launch, make_job

from pipeline.config import load_job
from pipeline.data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]


def test_every_minutes_checkpoints_at_log_steps_when_every_steps_never_comes(digits_shards, tmp_path):
    job = make_job(digits_shards, **{
        "stages.finetune.max_steps": 12, "stages.finetune.log_every_steps": 4,
        "stages.finetune.checkpoint": {"every_steps": 1000, "every_minutes": 1e-6, "keep_last": 5},
        "stages.finetune.init": "scratch",
    })
    launch(tmp_path, job, "finetune")
    checkpoints = Records(tmp_path).folder("finetune") / "work" / "checkpoints"
    tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert tags == ["step00000004", "step00000008", "step00000012"]  # log steps (and the final one)


def test_quickstart_training_stages_checkpoint_before_they_end(digits_shards):
    job = load_job(REPO / "jobs" / "quickstart.yaml")
    samples = load_manifest(digits_shards["train"]).num_samples
    for name in ("pretrain", "finetune"):
        settings = getattr(job.stages, name)
        steps_per_epoch = samples // (settings.batch_size * job.scaling.num_workers) // settings.grad_accum_steps
        total = settings.max_steps or int(settings.epochs * steps_per_epoch)
        assert settings.checkpoint.every_steps < total, (name, settings.checkpoint.every_steps, total)
        assert settings.checkpoint.every_minutes is not None
