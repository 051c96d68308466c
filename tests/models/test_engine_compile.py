"""`deepspeed.compile: true`: the DeepSpeed engine trains the torch.compile'd MIM model like the eager one.

A real engine (pipeline.train.engine.build_engine, one-process gloo group, ZeRO-1) on CPU, the tiny model
cut to one block: two optimizer steps with per-step metrics and the firing-rate probe, compared
with an eager engine from the same weights.
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

pytestmark = pytest.mark.usefixtures("one_thread")


def _engine(model: torch.nn.Module, compile_module: bool):
    loop = LoopSettings(batch_size=4, max_steps=2, log_every_steps=1, firing_rate_every_steps=2)
    return build_engine(model, DeepSpeedSettings(zero_stage=1, compile=compile_module),
                        OptimizerSettings(warmup_epochs=0, lr=1e-3), loop, loss_fn=mim_loss, steps_per_epoch=2)


def _train(engine, batch, seed: int) -> list:
    outs = []
    for step in range(2):
        torch.manual_seed(seed + step)  # the same random masks in both engines
        outs.append(engine.train_step([batch]))
    return outs


def test_compiled_engine_steps_like_the_eager_engine():
    torch.manual_seed(0)
    encoder = models.create("spikformer_v2_tiny", depth=1, num_classes=0)
    model = MaskedImageModel(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    twin = copy.deepcopy(model)
    initial_pred = model.decoder_pred.weight.detach().clone()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = (images, torch.zeros(4, dtype=torch.long))

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # compiled RNG = eager RNG: same masks
        compiled = _engine(twin, compile_module=True)
        assert compiled.ds.is_compiled
        compiled_out = _train(compiled, batch, seed=5)
    eager = _engine(model, compile_module=False)
    assert not eager.ds.is_compiled
    eager_out = _train(eager, batch, seed=5)

    for got, expected in zip(compiled_out, eager_out, strict=True):
        assert got.step == expected.step
        assert got.loss == pytest.approx(expected.loss, rel=1e-4)
    # step 2's loss, equal in both engines, follows an optimizer step that did move the weights
    assert not torch.equal(twin.decoder_pred.weight, initial_pred)
    rates = {k: v for k, v in compiled_out[1].metrics.items() if k.startswith("firing_rate_train/")}
    assert rates and rates == pytest.approx({k: eager_out[1].metrics[k] for k in rates}, rel=1e-3, abs=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize(("setting", "cuda", "compiled"), [
    ("auto", True, True), ("auto", False, False),  # the default: compiled where it pays, on CUDA
    (True, False, True), (False, True, False),  # an explicit choice wins either way
])
def test_compile_setting_resolves_auto_by_device(setting, cuda, compiled):
    from pipeline.train.engine import use_compile

    assert DeepSpeedSettings().compile == "auto"
    assert use_compile(DeepSpeedSettings(compile=setting), cuda=cuda) is compiled


def test_compile_setting_rejects_other_values():
    from pipeline.errors import PipelineError

    for bad in ("sometimes", "cuda", 1.5):
        with pytest.raises((ValueError, PipelineError)):
            DeepSpeedSettings(compile=bad)
