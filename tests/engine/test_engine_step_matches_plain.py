"""The pipeline's training step computes what the plain step computes.

benchmarks/pipeline_efficiency.py divides the pipeline's img/s by the plain step's (a bare torch
forward/backward/AdamW, as in benchmarks/gpu_step.py); that ratio only means "overhead" if both do the
same work. Here a real DeepSpeed engine (ZeRO-2, the jobs' default, one-process gloo group, fp32 on CPU)
and a plain loop over a copy of the same MIM model, the same batches, masks and AdamW groups must end two
steps with the same losses and the same weights. A control shows the check can fail: the plain loop with
a different learning rate ends elsewhere.
"""

from __future__ import annotations

import copy

import pytest
import torch

import models
from models.mim import MaskedImageModel
from pipeline.config import DeepSpeedSettings, LoopSettings, OptimizerSettings
from pipeline.stages.pretrain import mim_loss
from pipeline.train.engine import build_engine
from pipeline.train.optim import build_optimizer

STEPS = 2
LR = 1e-3


def _model() -> MaskedImageModel:
    torch.manual_seed(0)
    encoder = models.create("spikformer_v2_tiny", depth=1, num_classes=0)
    return MaskedImageModel(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=generator), torch.zeros(4, dtype=torch.long)) for _ in range(STEPS)]


def _plain_steps(model: torch.nn.Module, optim: OptimizerSettings, lr: float) -> list[float]:
    optimizer = build_optimizer(model, optim, lr)  # the same timm groups (no decay on 1-d params)
    losses = []
    for step, batch in enumerate(_batches()):
        torch.manual_seed(100 + step)  # the same masks as the engine's step
        loss = mim_loss(model, batch)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _largest_difference(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    return max((state[k] - other[k].float()).abs().max().item() for k in other)


def test_the_engine_step_equals_the_plain_step():
    optim = OptimizerSettings(warmup_epochs=0, lr=LR, min_lr=LR)  # a flat schedule: the plain loop's constant lr
    model = _model()
    plain_model, control_model = copy.deepcopy(model), copy.deepcopy(model)

    engine = build_engine(model, DeepSpeedSettings(zero_stage=2, precision="fp32", compile=False), optim,
                          LoopSettings(batch_size=4, max_steps=STEPS, log_every_steps=1), loss_fn=mim_loss,
                          steps_per_epoch=STEPS)
    engine_losses = []
    for step, batch in enumerate(_batches()):
        torch.manual_seed(100 + step)
        engine_losses.append(engine.train_step([batch]).loss)
    engine_state = engine.state_dict_fp32()

    plain_losses = _plain_steps(plain_model, optim, LR)
    assert engine_losses == pytest.approx(plain_losses, rel=1e-5)
    plain_state = plain_model.state_dict()
    assert engine_state.keys() == plain_state.keys()
    worst = _largest_difference(engine_state, plain_state)
    assert worst < 1e-5, worst
    assert _largest_difference(engine_state, control_model.state_dict()) > 1e-4  # the steps moved the weights

    # control: a plain loop with another learning rate ends measurably elsewhere
    _plain_steps(control_model, optim, 3 * LR)
    assert _largest_difference(engine_state, control_model.state_dict()) > 100 * worst + 1e-6
