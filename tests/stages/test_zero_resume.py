"""Each ZeRO stage (1, 2, 3): the stages through the real runner under torchrun (2 CPU ranks, gloo),
killed and resumed.

Per ZeRO stage two launches (see stage_helpers.launch):
1. stages up to the faulted one (16 steps each); the fault hook kills rank 0 right after optimizer
   step 6 (checkpoints every 4 steps), so the launch fails with step 4 as the last checkpoint;
2. pretrain, finetune, evaluate again: a finished stage is reused from the MLflow stage cache, the
   killed one continues from step 4 (its checkpoints are in its fingerprint-named work folder).
Variety per ZeRO stage: ZeRO-1 kills pretrain; ZeRO-2 kills pretrain and finetunes with Mixup/CutMix;
ZeRO-3 kills finetune, which keeps an EMA (its weights are checkpointed, resumed and exported).
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from stage_helpers import VAL_SAMPLES, Records, launch, make_job, read_jsonl, result, trace

import models  # noqa: F401
from pipeline.train.checkpoint import read_latest
from pipeline.train.export import export_digest, read_export

pytestmark = pytest.mark.slow

STEPS, EVERY, KILL_AT = 16, 4, 6
CASES = {1: ("pretrain", {}), 2: ("pretrain", {"stages.finetune.mixup": 0.8, "stages.finetune.cutmix": 1.0}),
         3: ("finetune", {"stages.finetune.ema": {"enabled": True, "decay": 0.9}})}


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda z: f"zero{z}")
def runs(request, digits_shards, tmp_path_factory):
    zero = request.param
    killed, extra = CASES[zero]
    out = tmp_path_factory.mktemp(f"stages_zero{zero}")
    job = make_job(digits_shards, **{
        "deepspeed.zero_stage": zero, "stages.pretrain.max_steps": STEPS, "stages.finetune.max_steps": STEPS,
        "stages.pretrain.checkpoint.every_steps": EVERY, "stages.finetune.checkpoint.every_steps": EVERY,
        **extra,
    })
    first = "pretrain" if killed == "pretrain" else "pretrain,finetune"
    launch(out, job, first, expect_rc=1, fault=f"{killed}:0:{KILL_AT}")
    first_run = {stage: trace(out, stage) for stage in ("pretrain", "finetune")}
    pretrain_digest = result(out, "pretrain")["export_digest"] if killed == "finetune" else None
    (out / "trace-rank0.jsonl").rename(out / "trace-run1-rank0.jsonl")
    (out / "trace-rank1.jsonl").rename(out / "trace-run1-rank1.jsonl")
    launch(out, job, "pretrain,finetune,evaluate")
    return {"zero": zero, "killed": killed, "out": out, "first": first_run, "pretrain_digest": pretrain_digest}


def test_killed_stage_resumes_at_the_checkpoint_with_the_same_next_batch(runs):
    stage, out = runs["killed"], runs["out"]
    before = {r["step"]: r for r in runs["first"][stage]}
    after = {r["step"]: r for r in trace(out, stage)}
    assert sorted(before) == list(range(1, KILL_AT + 1))  # killed right after step 6
    assert sorted(after) == list(range(EVERY + 1, STEPS + 1))  # continued after the step-4 checkpoint
    for step in range(EVERY + 1, KILL_AT + 1):  # the steps both runs made: same data, same result
        assert after[step]["batch"] == before[step]["batch"], step
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-6, abs=1e-7), step
    for rank in (0, 1):  # the other rank also saw the same batches
        b = {r["step"]: r["batch"] for r in read_jsonl(out / f"trace-run1-rank{rank}.jsonl") if r["stage"] == stage}
        a = {r["step"]: r["batch"] for r in trace(out, stage, rank)}
        assert all(a[s] == b[s] for s in range(EVERY + 1, KILL_AT + 1))
    if stage == "finetune":  # pretrain had finished in run 1: run 2 reused it from the stage cache
        assert trace(out, "pretrain") == []
        assert result(out, "pretrain")["export_digest"] == runs["pretrain_digest"]


def test_loss_decreases(runs):
    stage, out = runs["killed"], runs["out"]
    losses = {r["step"]: r["loss"] for r in runs["first"][stage]} | {r["step"]: r["loss"] for r in trace(out, stage)}
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    # 16 steps: pretraining falls by half; the finetune with EMA (ZeRO-3 case) moves only a few percent
    assert last < (0.99 if stage == "finetune" else 0.97) * first, (first, last)


def _folder(out, stage):
    return Records(out).folder(stage)


def _final_checkpoint(stage_dir):
    ckpt_dir = stage_dir / "work" / "checkpoints"
    tag = read_latest(ckpt_dir)
    assert tag == f"step{STEPS:08d}"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def test_exports_equal_the_final_checkpoint_and_reload_strictly(runs):
    out = runs["out"]
    # pretrain: the encoder part of the consolidated ZeRO checkpoint, under the classifier's names
    state, config = read_export(str(_folder(out, "pretrain") / "export"))
    ckpt = _final_checkpoint(_folder(out, "pretrain"))
    encoder = {k.removeprefix("encoder."): v for k, v in ckpt.items() if k.startswith("encoder.")}
    assert set(state) == set(encoder) and not any(k.startswith("head.") for k in state)
    assert all(torch.equal(state[k], encoder[k]) for k in state)
    model = timm.create_model(config["variant"], **config["kwargs"])
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # finetune: the whole classifier (or, with EMA, the EMA weights kept in the checkpoint)
    finetune = _folder(out, "finetune")
    state, config = read_export(str(finetune / "export"))
    assert config["ema"] == (runs["zero"] == 3)
    if config["ema"]:
        tag = read_latest(finetune / "work" / "checkpoints")
        files = sorted((finetune / "work" / "checkpoints" / tag).glob("*model_states.pt"))
        client = torch.load(files[0], map_location="cpu", weights_only=False)
        reference = client["ema"]
        live = _final_checkpoint(finetune)
        assert any(not torch.equal(live[k], reference[k]) for k in live)  # EMA differs from the live weights
    else:
        reference = _final_checkpoint(finetune)
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in state)
    model = timm.create_model(config["variant"], **config["kwargs"])
    model.load_state_dict(state, strict=True)
    assert result(out, "finetune")["export_digest"] == export_digest(str(finetune / "export"))


def test_every_rank_keeps_its_last_checkpoints(runs):
    """keep_last (2) tags stay, each with every rank's ZeRO shards; the killed run's first tags are pruned."""
    checkpoints = _folder(runs["out"], runs["killed"]) / "work" / "checkpoints"
    assert read_latest(checkpoints) == f"step{STEPS:08d}"
    tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert tags == [f"step{STEPS - EVERY:08d}", f"step{STEPS:08d}"]
    for tag in tags:
        shards = (checkpoints / tag).glob("*optim_states.pt")
        ranks = {re.search(r"zero_pp_rank_(\d+)_", p.name).group(1) for p in shards}
        assert ranks == {"0", "1"}, (tag, ranks)


def test_evaluate_counts_every_sample_once(runs):
    metrics = result(runs["out"], "evaluate")["metrics"]
    assert metrics["n_samples"] == VAL_SAMPLES
