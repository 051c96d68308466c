"""AdamW over timm parameter groups, the lr scaling rule and the per-step cosine schedule.

- Groups: timm's `param_groups_weight_decay` (no decay for 1-d params: BN, biases, tokens, plus
  `model.no_weight_decay()`), or `param_groups_layer_decay` when `layer_decay` is set (it uses the
  model's `group_matcher` and puts an `lr_scale` on each group).
- lr = `lr` if given, else `base_lr * global_batch / 256` (MAE/BEiT rule), global batch =
  micro-batch x world size x accumulation steps.
- Schedule: timm `CosineLRScheduler` counted in optimizer steps (`t_in_epochs=False`), linear
  warmup from `warmup_lr` then cosine to `min_lr`. timm's `Scheduler.update_groups` multiplies
  by each group's `lr_scale`, so layer decay needs nothing extra here (checked in tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from pipeline.config import OptimizerSettings


@dataclass(frozen=True)
class ScheduleLength:
    total_steps: int  # optimizer steps the cosine spans (warmup included)
    warmup_steps: int


def resolve_lr(optim: OptimizerSettings, global_batch: int) -> float:
    return optim.lr if optim.lr is not None else optim.base_lr * global_batch / 256


def schedule_length(
    optim: OptimizerSettings, *, epochs: float, steps_per_epoch: int, max_steps: int | None
) -> ScheduleLength:
    """Schedule length in optimizer steps: `max_steps` when given (it overrides `epochs`, as in most
    trainers), else `epochs` worth of steps. Warmup is `warmup_epochs` worth, kept below the total."""
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
    warmup = min(round(optim.warmup_epochs * steps_per_epoch), total - 1)
    return ScheduleLength(total_steps=total, warmup_steps=max(0, warmup))


def param_groups(model: torch.nn.Module, optim: OptimizerSettings) -> list[dict]:
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if optim.layer_decay is not None:
        return param_groups_layer_decay(
            model,
            weight_decay=optim.weight_decay,
            no_weight_decay_list=no_decay,
            layer_decay=optim.layer_decay,
        )
    return param_groups_weight_decay(model, weight_decay=optim.weight_decay, no_weight_decay_list=no_decay)


def build_optimizer(model: torch.nn.Module, optim: OptimizerSettings, lr: float) -> torch.optim.AdamW:
    """torch's AdamW (DeepSpeed's fused/CPU Adam would JIT-compile C++ first)."""
    return torch.optim.AdamW(param_groups(model, optim), lr=lr, betas=optim.betas, eps=optim.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimizerSettings, length: ScheduleLength
) -> CosineLRScheduler:
    """Cosine over optimizer steps; call `step_update(completed_steps)` after every optimizer step."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, length.total_steps - length.warmup_steps),
        lr_min=optim.min_lr,
        warmup_t=length.warmup_steps,
        warmup_lr_init=optim.warmup_lr,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )
