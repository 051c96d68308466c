"""torch.compile sees the 172M pretraining and finetuning modules as one graph: no break, no recompile.

Dynamo's own counters (``torch._dynamo.utils.counters``) after two training-mode forwards under bf16
autocast with ``backend="eager"`` (tracing only, nothing generated: seconds on a CPU). The graph
structure does not depend on the image size, so spikformer_v2_16_768 runs at 64 px (4 x 4 tokens).

Run on the project's torch pin by ``make test`` and on the GPU image's torch 2.11 by
``make test-torch211`` (a throwaway CPU venv): torch 2.11's dynamo could not trace
``torch.amp.is_autocast_available`` (a break in every block), and each resumed frame then specialised
on the block's Python stochastic-depth rate until the recompile limit (8) sent the rest to eager.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import models
from models.mim import MaskedImageModel
from models.spikformer import TimeDropPath

pytestmark = pytest.mark.usefixtures("one_thread")


def compile_counts(model: torch.nn.Module, images: torch.Tensor, calls: int = 2) -> dict:
    """Graphs, graph breaks and frame compilations of ``calls`` training forwards under bf16 autocast.

    ``frames`` counts every frame dynamo compiled, recompilations included: one graph and one frame after
    two calls (a new random mask and new drop-path draws in the second) means nothing recompiled.
    """
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(calls):
            compiled(images)
    result = {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
        "frames": counters["frames"]["total"],
        "reasons": sorted({reason.splitlines()[0] for reason in counters["graph_break"]}),
    }
    torch._dynamo.reset()
    return result


def assert_one_graph(counts: dict) -> None:
    assert (counts["graphs"], counts["breaks"], counts["frames"]) == (1, 0, 1), counts


def _model(kind: str, variant: str, img: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "pretrain":  # the pretraining job's module: MIM around the classifier, mask ratio 0.6
        encoder = models.create(variant, img_size=img, num_classes=0, drop_path_rate=0.1, **kwargs)
        return MaskedImageModel(encoder, mask_ratio=0.6).train()
    return models.create(variant, img_size=img, num_classes=10, drop_path_rate=0.1, **kwargs).train()


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_172m_modules_trace_to_one_graph_under_bf16_autocast(kind):
    model = _model(kind, "spikformer_v2_16_768", img=64)
    assert sum(b.drop_path.drop_prob > 0 for b in model.modules() if isinstance(b, models.Block)) == 15
    assert_one_graph(compile_counts(model, torch.randn(2, 3, 64, 64)))


def _break_in_every_block(model: torch.nn.Module) -> None:
    """What the autocast query did on torch 2.11: a graph break inside every block's attention."""
    for module in model.modules():
        if isinstance(module, models.SSA):
            module.register_forward_pre_hook(lambda m, args: torch._dynamo.graph_break())


def _tiny_with_breaks(depth: int) -> torch.nn.Module:
    model = _model("finetune", "spikformer_v2_tiny", img=32, depth=depth)
    _break_in_every_block(model)
    return model


def _float_guarded_forward(self: TimeDropPath, x: torch.Tensor) -> torch.Tensor:
    """The old stochastic depth: a branch on the block's Python float rate (a guard per rate)."""
    if self.drop_prob == 0.0 or not self.training:
        return x
    keep = 1.0 - self.drop_prob
    return x * (torch.rand((1, x.shape[1], *(1,) * (x.dim() - 2))) < keep).to(x.dtype) / keep


def test_frames_resumed_inside_blocks_compile_once_whatever_the_depth(monkeypatch):
    """Even when something breaks the graph inside every block, the resumed frames compile once for all
    blocks, not once per block: the stochastic-depth rate is no guard. Also the control of the check above."""
    images = torch.randn(2, 3, 32, 32)
    shallow = compile_counts(_tiny_with_breaks(depth=2), images, calls=1)
    deep = compile_counts(_tiny_with_breaks(depth=4), images, calls=1)
    with pytest.raises(AssertionError):  # a break inside a block fails the one-graph check
        assert_one_graph(shallow)
    assert shallow["breaks"] > 0 and deep["frames"] == shallow["frames"], (shallow, deep)
    # control: a Python-float rate makes every block's resumed frame a new compilation
    monkeypatch.setattr(TimeDropPath, "forward", _float_guarded_forward)
    float_shallow = compile_counts(_tiny_with_breaks(depth=2), images, calls=1)
    float_deep = compile_counts(_tiny_with_breaks(depth=4), images, calls=1)
    assert float_deep["frames"] > float_shallow["frames"], (float_shallow, float_deep)


def test_time_drop_path_drops_whole_samples_at_its_rate():
    torch.manual_seed(0)
    drop = TimeDropPath(0.25).train()
    x = torch.ones(2, 4000, 3)  # [T, B, C]
    out = drop(x)
    per_sample = out[:, :, :1]
    assert torch.equal(out, per_sample.expand_as(out))  # one decision per sample, for all T and channels
    assert per_sample.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert (per_sample == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)  # 4000 draws: 4.4 sd
    assert drop.eval()(x) is x and TimeDropPath(0.0).train()(x) is x
    assert torch.equal(TimeDropPath(0.0, enabled=True).train()(x), x)  # on, at rate 0: keeps everything
    with pytest.raises(ValueError, match="drop_prob"):
        TimeDropPath(1.0)


def test_time_drop_path_rate_survives_a_bf16_cast_and_is_not_saved():
    model = models.create("spikformer_v2_tiny", depth=3, drop_path_rate=0.3).bfloat16()
    rates = [b.drop_path.rate for b in model.block]
    assert all(r.dtype == torch.float32 for r in rates)
    assert [r.item() for r in rates] == [torch.tensor(p).item() for p in (0.0, 0.15, 0.3)]
    assert [b.drop_path.enabled for b in model.block] == [True, True, True]  # one switch for the model
    assert not any("drop_path" in key for key in model.state_dict())  # checkpoints are unchanged


def test_compiled_masked_batch_norm_has_the_eager_gradients():
    """torch 2.11's AOTAutograd gave every input of a Function whose forward mutated its output a zero
    gradient: the masked stem of a compiled pretraining step learnt nothing there."""
    from models.spikformer import MaskedBatchNorm2d

    torch.manual_seed(0)
    bn = MaskedBatchNorm2d(4).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    keep, weights = torch.rand(2, 1, 8, 8) < 0.6, torch.randn(2, 4, 8, 8)

    def loss(x):
        return (bn(x, keep) * weights).sum()

    torch._dynamo.reset()
    expected = torch.autograd.grad(loss(x), [x, bn.weight, bn.bias])
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(x), [x, bn.weight, bn.bias])
    torch._dynamo.reset()
    for g_got, g_expected in zip(got, expected, strict=True):
        assert g_expected.abs().max() > 0
        torch.testing.assert_close(g_got, g_expected, rtol=1e-5, atol=1e-6)
