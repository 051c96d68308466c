"""The model's fast paths: torch.compile (Inductor, CPU) gives the eager outputs; SSA's cheap order; bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from models.spikformer import SSA


def _pair(train: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    eager = models.create("spikformer_v2_tiny", T=2).train(train)
    twin = models.create("spikformer_v2_tiny", T=2).train(train)
    twin.load_state_dict(eager.state_dict())
    return eager, twin


def test_compiled_tiny_forward_matches_eager():
    eager, twin = _pair(train=False)
    compiled = torch.compile(twin, dynamic=False)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = eager(images), compiled(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_tiny_train_step_matches_eager():
    eager, twin = _pair(train=True)
    compiled = torch.compile(twin, dynamic=False)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 5, 9])
    loss_eager = torch.nn.functional.cross_entropy(eager(images), labels)
    loss_compiled = torch.nn.functional.cross_entropy(compiled(images), labels)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-4, atol=1e-5)
    loss_eager.backward()
    loss_compiled.backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-3, atol=1e-5, msg=name)
    for (name, b_eager), b_compiled in zip(eager.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b_compiled, b_eager, rtol=1e-4, atol=1e-5, msg=name)  # BN running stats


class _ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_ssa_never_materialises_n_by_n_and_matches_the_naive_order():
    torch.manual_seed(0)
    ssa = SSA(dim=32, num_heads=4).eval()  # head dim 8 < N = 36 tokens
    x = (torch.rand(2, 3, 32, 6, 6) < 0.3).float()  # [T, B, C, H, W] spikes
    with _ShapeLog() as log, torch.no_grad():
        out = ssa(x)
    assert all(s[-2:] != (36, 36) for s in log.shapes), "an N x N tensor was built"
    assert (2, 3, 4, 8, 8) in log.shapes  # the per-head K^T V

    # same spikes as the textbook order (Q K^T) V: products of 0/1 spikes are exact in either order
    captured = {}
    ssa.attn_lif.register_forward_pre_hook(lambda m, args: captured.__setitem__("in", args[0]))
    with torch.no_grad():
        ssa(x)
        rows = x.flatten(3).flatten(0, 1)
        heads = (2, 3, 4, 8, 36)
        q, k, v = (ssa._spikes(n, rows, 2, None).reshape(heads).transpose(-1, -2) for n in "qkv")
        naive = ((q @ k.transpose(-1, -2)) @ v * ssa.scale).transpose(-1, -2).reshape(6, 32, 36)
    torch.testing.assert_close(captured["in"].flatten(0, 1), naive, rtol=0, atol=1e-6)
    assert out.shape == x.shape


def test_tiny_model_under_bf16_autocast():
    torch.manual_seed(0)
    model = models.create("spikformer_v2_tiny", T=2).train()
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
