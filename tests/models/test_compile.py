"""torch.compile (Inductor, CPU) on the tiny Spikformer gives the eager outputs."""

from __future__ import annotations

import pytest
import torch

import models


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
