"""Parameter groups, the lr rule, the schedule and the DeepSpeed config (in-process, no DeepSpeed engine)."""

from __future__ import annotations

import pytest
import torch
from toy import ToyNet

from pipeline.config import DeepSpeedSettings, LoopSettings, OptimizerSettings
from pipeline.train.engine import deepspeed_config
from pipeline.train.optim import (
    ScheduleLength,
    build_optimizer,
    build_scheduler,
    param_groups,
    resolve_lr,
    schedule_length,
)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_weight_decay_on_bn_bias_and_listed_params():
    model = ToyNet()
    model.no_weight_decay = lambda: {"head.weight"}
    groups = param_groups(model, OptimizerSettings(weight_decay=0.05))
    decay = set().union(*(_names(model, g) for g in groups if g["weight_decay"] > 0))
    no_decay = set().union(*(_names(model, g) for g in groups if g["weight_decay"] == 0))
    assert decay == {"stem.0.weight", "block.0.0.weight", "block.1.0.weight"}
    assert {"stem.1.weight", "stem.1.bias", "block.0.0.bias", "head.bias", "head.weight"} <= no_decay
    assert decay | no_decay == {n for n, _ in model.named_parameters()}


def test_layer_decay_follows_group_matcher():
    model = ToyNet(depth=3)
    groups = param_groups(model, OptimizerSettings(layer_decay=0.5))
    scale_of = {name: g["lr_scale"] for g in groups for name in _names(model, g)}
    # stem = layer 0, block i = i + 1, head = L + 1 (= 4): scale 0.5 ** (4 - layer)
    assert scale_of["stem.0.weight"] == 0.5**4
    assert scale_of["block.0.0.weight"] == 0.5**3
    assert scale_of["block.2.0.bias"] == 0.5**1
    assert scale_of["head.weight"] == 1.0


def test_lr_scales_with_global_batch_unless_given():
    assert resolve_lr(OptimizerSettings(base_lr=1.5e-4), 512) == pytest.approx(3e-4)
    assert resolve_lr(OptimizerSettings(base_lr=1.5e-4, lr=1e-3), 512) == 1e-3


def test_schedule_length():
    opt = OptimizerSettings(warmup_epochs=2)
    assert schedule_length(opt, epochs=3, steps_per_epoch=10, max_steps=None) == ScheduleLength(30, 20)
    assert schedule_length(opt, epochs=3, steps_per_epoch=10, max_steps=50).total_steps == 50  # overrides
    assert schedule_length(opt, epochs=1, steps_per_epoch=10, max_steps=None).warmup_steps == 9  # < total


def test_cosine_with_warmup_per_step_and_lr_scale():
    model = ToyNet()
    opt_settings = OptimizerSettings(lr=1.0, warmup_lr=0.0, min_lr=0.1, warmup_epochs=1, layer_decay=0.5)
    optimizer = build_optimizer(model, opt_settings, lr=1.0)
    length = schedule_length(opt_settings, epochs=5, steps_per_epoch=4, max_steps=None)  # 20 steps, 4 warmup
    sched = build_scheduler(optimizer, opt_settings, length)
    head = next(g for g in optimizer.param_groups if g["lr_scale"] == 1.0)
    stem = min(optimizer.param_groups, key=lambda g: g["lr_scale"])
    seen = []
    for step in range(0, 21):
        sched.step_update(step)
        seen.append(head["lr"])
        assert stem["lr"] == pytest.approx(head["lr"] * stem["lr_scale"])
    assert seen[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # linear warmup, peak at step 4
    assert seen[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert seen[20] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(seen[4:20], seen[5:21], strict=True))


def test_optimizer_is_torch_adamw():
    opt = build_optimizer(ToyNet(), OptimizerSettings(betas=(0.9, 0.95), eps=1e-6), lr=0.1)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6


def test_deepspeed_config_from_settings():
    ds = DeepSpeedSettings(zero_stage=3, grad_clip=1.0, config_overrides={"zero_optimization": {"overlap_comm": True}})
    config = deepspeed_config(ds, LoopSettings(batch_size=8, grad_accum_steps=4), world_size=2)
    assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}  # merged, not replaced
    assert config["bf16"]["enabled"] is torch.cuda.is_available()  # precision auto
    assert deepspeed_config(DeepSpeedSettings(precision="bf16"), LoopSettings(), 1)["bf16"]["enabled"] is True
    assert deepspeed_config(DeepSpeedSettings(precision="fp32"), LoopSettings(), 1)["bf16"]["enabled"] is False
