"""The engine under `torchrun --nproc_per_node 2` on CPU/gloo, once per ZeRO stage (1, 2, 3).

One launch per stage runs every phase (see _dist_train.py); the tests below check its records.
Resume equality is checked bitwise: losses as Python floats and parameters with torch.equal.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from toy import VARIANT, VARIANT_KWARGS, create_spikformer

from models import MultiStepLIF
from pipeline.train.export import export_digest, read_export

STEPS, RESUME_AT, NEXT, NAN_STEP = 24, 15, 25, 26  # as in _dist_train.py


def _by_step(d: dict) -> dict[int, object]:
    return {int(k): v for k, v in d.items()}


def test_no_cpp_extension_is_built(run):
    # the launch had no working compiler; the shm comm op must be off and nothing JIT-built
    for rank in run["ranks"]:
        assert rank["shm_comm_op"] == "None"
    ext = run["out"] / "torch_extensions"
    assert not ext.exists() or not any(ext.iterdir()), list(ext.iterdir())


def test_loss_decreases(run):
    losses = _by_step(run["ranks"][0]["u_losses"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in range(1, 5)) / 4
    last = sum(losses[s] for s in range(STEPS - 3, STEPS + 1)) / 4
    assert last < 0.85 * first, (first, last)
    # the loss is averaged over ranks: both ranks report the same number
    assert run["ranks"][0]["u_losses"] == run["ranks"][1]["u_losses"]


def test_metrics_at_log_steps(run):
    metrics = _by_step(run["ranks"][0]["u_metrics"])
    assert sorted(metrics) == [4, 8, 12, 16, 20, 24]  # log_every_steps=4
    for step, m in metrics.items():
        for key in (
            "loss",
            "lr",
            "grad_norm",
            "images_per_s",
            "step_time",
            "peak_mem_mb",
            "skipped_samples",
            "acc",
        ):
            assert key in m and math.isfinite(m[key]), (step, key, m)
        assert m["images_per_s"] > 0 and m["step_time"] > 0 and m["peak_mem_mb"] > 50 and m["grad_norm"] > 0
        assert m["skipped_samples"] == 1 + 2  # each rank passed rank + 1: summed over ranks
        has_rates = any(k.startswith("firing_rate_train/") for k in m)
        assert has_rates == (step % 8 == 0), (step, sorted(m))  # firing_rate_every_steps=8
    # models.energy.FiringRateProbe (the default): one rate per LIF layer, from the training forward
    lif_names = {n for n, m in create_spikformer().named_modules() if isinstance(m, MultiStepLIF)}
    for step in (8, 16, 24):
        rates = {k.removeprefix("firing_rate_train/"): v for k, v in metrics[step].items()
                 if k.startswith("firing_rate_train/")}
        assert set(rates) == lif_names
        assert all(0 <= v <= 1 for v in rates.values()) and any(v > 0 for v in rates.values())
    # interval mean of the per-step losses
    losses = _by_step(run["ranks"][0]["u_losses"])
    assert metrics[8]["loss"] == pytest.approx(sum(losses[s] for s in range(5, 9)) / 4, rel=1e-12)


def test_schedule_per_optimizer_step(run):
    lrs = _by_step(run["ranks"][0]["u_lrs"])
    # warmup_epochs=1 = 4 optimizer steps (64 samples / (4 x 2 x 2)): 1e-4 up to 1e-2, then cosine to 1e-4
    assert lrs[4] == pytest.approx(1e-2)
    assert lrs[1] < lrs[2] < lrs[3] < lrs[4]
    assert all(lrs[s] > lrs[s + 1] for s in range(4, STEPS))
    assert lrs[STEPS] == pytest.approx(1e-4)


def test_layer_decay_groups(run):
    scales = sorted({scale for _, scale in run["ranks"][0]["group_lrs"]})
    if run["zero"] != 2:
        assert scales == [1.0]
        return
    # stem, block 0, block 1, head -> 0.75**3 .. 1; timm's scheduler applies lr_scale to every group
    assert scales == pytest.approx([0.75**3, 0.75**2, 0.75, 1.0])
    for lr, scale in run["ranks"][0]["group_lrs"]:
        assert lr == pytest.approx(1e-4 * scale)  # warmup_lr at step 0, scaled


def test_export_reloads_bit_exactly(run):
    r0, r1 = run["ranks"]
    assert r0["export_equals_engine"]
    if run["zero"] > 0:  # DeepSpeed's own consolidation of the ZeRO checkpoint gives the same tensors
        assert r0["export_equals_zero_to_fp32"]
    assert r0["export_dtypes"] == ["torch.float32", "torch.int64"]  # fp32 floats, BN counters stay int
    url = str(run["out"] / "export_u")
    assert r0["digest"] == r1["digest"] == export_digest(url)
    state_dict, config = read_export(url)
    assert config["format"] == "spikformer-export/1" and config["variant"] == VARIANT
    assert config["kwargs"] == VARIANT_KWARGS and config["step"] == STEPS and config["stage"] == "test"
    model = timm.create_model(config["variant"], **config["kwargs"])
    model.load_state_dict(state_dict, strict=True)
    assert any("running_mean" in k for k in state_dict)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state_dict[name]), name


def test_resume_continues_at_the_saved_step(run):
    for rank in run["ranks"]:
        assert rank["r_state"] == {"step": RESUME_AT, "epoch": 3, "batch_in_epoch": 6, "note": "toy"}
        assert rank["r_lr_after_resume"] == rank["u_lr_at_resume"]
        u_ids, r_ids = _by_step(rank["u_ids"]), _by_step(rank["r_ids"])
        assert min(r_ids) == RESUME_AT + 1
        assert r_ids[RESUME_AT + 1] == u_ids[RESUME_AT + 1]  # the same next batch on this rank
        assert all(r_ids[s] == u_ids[s] for s in r_ids)
        u_loss, r_loss = _by_step(rank["u_losses"]), _by_step(rank["r_losses"])
        assert all(r_loss[s] == u_loss[s] for s in r_loss)  # bitwise: same float
        assert rank["r_params_equal_u"]  # every parameter and buffer, torch.equal


def test_checkpoint_tags_and_pruning(run):
    for rank in run["ranks"]:
        assert rank["u_tags"] == ["step00000015", "step00000020", "step00000024"]  # keep_last=3
        assert rank["u_latest"] == "step00000024"


def test_nan_loss_stops_without_saving(run):
    for rank in run["ranks"]:
        assert rank["nan_error"] and f"step {NAN_STEP}" in rank["nan_error"]  # raised on both ranks
        assert "refusing" in rank["save_after_nan"]
        assert rank["nan_latest"] == ["step00000024", "step00000024"]
        assert f"step{NAN_STEP:08d}" not in rank["nan_tags"]


def test_unpublished_tag_is_not_resumed(run):
    for rank in run["ranks"]:
        assert f"step{NEXT:08d}" in rank["crash_tags"]  # written, but `latest` not moved
        assert rank["crash_resumed_step"] == STEPS
        assert rank["crash_params_equal_u"]
        assert rank["c_loss"] == rank["e_loss"]  # step NEXT redone bit-exactly
        assert rank["after_crash_latest"] == f"step{NEXT:08d}"  # the next real save publishes again


def test_bf16_trains_and_exports_fp32_master_weights(run):
    for rank in run["ranks"]:
        assert len(rank["bf16_losses"]) == 3 and all(math.isfinite(x) for x in rank["bf16_losses"])
        assert rank["bf16_module_dtypes"] == ["torch.bfloat16"]
        assert rank["bf16_export_dtypes"] == ["torch.float32", "torch.int64"]
        # the export holds the fp32 master copy: it rounds to the bf16 weights but carries more bits
        assert rank["bf16_export_rounds_to_module"] and rank["bf16_export_is_not_just_bf16"]
