"""Multi-step LIF against hand-computed sequences and the surrogate-gradient formula."""

from __future__ import annotations

import math

import pytest
import torch

from models.neuron import MultiStepLIF, lif_multistep, lif_step, register_lif_backend


def column(values: list[float]) -> torch.Tensor:
    """A [T, B=1] float64 input sequence."""
    return torch.tensor(values, dtype=torch.float64).reshape(-1, 1)


def sig_grad(x: float, alpha: float = 4.0) -> float:
    s = 1.0 / (1.0 + math.exp(-alpha * x))
    return alpha * s * (1.0 - s)


def test_hand_computed_sequence_spikes_and_hard_reset():
    # tau=2, V_th=1, V_reset=0: H = V + (X - V) / 2
    # t0: H=0.75 no spike, V=0.75 | t1: H=0.75+(1.5-0.75)/2=1.125 spike, V=0
    # t2: H=0.25 no spike, V=0.25 | t3: H=0.25+(3-0.25)/2=1.625 spike, V=0 | t4: H=0, no spike
    x = column([1.5, 1.5, 0.5, 3.0, 0.0])
    assert MultiStepLIF()(x).flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_membrane_trace_step_by_step():
    x = column([1.5, 1.5, 0.5, 3.0])
    expected_h = [0.75, 1.125, 0.25, 1.625]
    expected_v = [0.75, 0.0, 0.25, 0.0]
    v = torch.zeros(1, dtype=torch.float64)
    for t in range(4):
        s, h, v = lif_step(v, x[t], tau=2.0, v_threshold=1.0, v_reset=0.0, alpha=4.0, detach_reset=True)
        assert h.item() == pytest.approx(expected_h[t])
        assert v.item() == pytest.approx(expected_v[t])
        assert s.item() == float(expected_h[t] >= 1.0)


def test_threshold_is_inclusive_and_configurable():
    assert lif_multistep(column([2.0])).item() == 1.0  # H = 1.0 >= V_th
    assert lif_multistep(column([1.99])).item() == 0.0
    assert lif_multistep(column([1.0]), v_threshold=0.5).item() == 1.0  # the attention neuron
    assert lif_multistep(column([1.0]), tau=1.0).item() == 1.0  # no leak: H = X


def test_nonzero_reset_and_soft_reset():
    # V_reset = -0.5: V starts at -0.5; H = V + (X - (V + 0.5)) / 2
    x = column([3.0, 0.0])
    s_hard = lif_multistep(x, v_reset=-0.5)
    # t0: H = -0.5 + (3 + 0) / 2 = 1.0 -> spike, V = -0.5; t1: H = -0.5 + 0 = -0.5
    assert s_hard.flatten().tolist() == [1.0, 0.0]
    # soft reset: V = H - V_th. t0: H=1.5 spike, V=0.5; t1: H = 0.5 + (1.6-0.5)/2 = 1.05 spike
    assert lif_multistep(column([3.0, 1.6]), v_reset=None).flatten().tolist() == [1.0, 1.0]
    # the same input with a hard reset: t1: H = 0 + 1.6/2 = 0.8 -> no spike
    assert lif_multistep(column([3.0, 1.6])).flatten().tolist() == [1.0, 0.0]


def test_single_step_is_thresholded_step_of_x_over_tau():
    x = torch.linspace(-3, 5, 101, dtype=torch.float64).reshape(1, -1)
    for tau, v_th in ((2.0, 1.0), (3.0, 0.5), (1.5, 2.0)):
        out = lif_multistep(x, tau=tau, v_threshold=v_th)
        assert torch.equal(out, (x / tau >= v_th).to(x.dtype))


def test_surrogate_gradient_single_step_matches_formula():
    x = torch.tensor([[-1.0, 0.5, 1.9, 2.0, 2.4, 6.0]], dtype=torch.float64, requires_grad=True)
    for alpha in (4.0, 2.0):
        (grad,) = torch.autograd.grad(lif_multistep(x, alpha=alpha).sum(), x)
        # dS/dX = g'(H - V_th) * dH/dX, H = X / tau
        expected = [sig_grad(v / 2.0 - 1.0, alpha) / 2.0 for v in x.detach().flatten().tolist()]
        assert grad.flatten().tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("x0", [1.0, 2.5])  # below and above threshold at t0
def test_surrogate_gradient_through_time_with_detached_reset(x0):
    x1 = 1.2
    x = column([x0, x1]).requires_grad_(True)
    out = lif_multistep(x, detach_reset=True)
    (grad,) = torch.autograd.grad(out[1].sum(), x)
    h0 = x0 / 2.0
    s0 = float(h0 >= 1.0)
    v0 = h0 * (1.0 - s0)
    h1 = v0 + (x1 - v0) / 2.0
    # S1 = step(H1 - 1), H1 = V0 / 2 + X1 / 2, V0 = H0 (1 - S0_detached), H0 = X0 / 2
    assert grad[1].item() == pytest.approx(sig_grad(h1 - 1.0) * 0.5)
    assert grad[0].item() == pytest.approx(sig_grad(h1 - 1.0) * 0.5 * (1.0 - s0) * 0.5)


def test_attached_reset_adds_the_reset_path_gradient():
    x0, x1 = 2.5, 1.2
    x = column([x0, x1]).requires_grad_(True)
    (grad,) = torch.autograd.grad(lif_multistep(x, detach_reset=False)[1].sum(), x)
    h0 = x0 / 2.0
    s0 = 1.0
    h1 = h0 * (1 - s0) / 2.0 + x1 / 2.0
    # dV0/dX0 = (1 - S0) / 2 - H0 * g'(H0 - 1) / 2
    dv0 = (1 - s0) * 0.5 - h0 * sig_grad(h0 - 1.0) * 0.5
    assert grad[0].item() == pytest.approx(sig_grad(h1 - 1.0) * 0.5 * dv0)


def test_state_is_local_to_each_call_and_shape_preserved():
    lif = MultiStepLIF()
    x = torch.full((3, 2, 4, 5), 1.5)
    first, second = lif(x), lif(x)
    assert torch.equal(first, second)  # no membrane carried over between calls
    assert first.shape == x.shape
    assert first[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0]


def test_backend_dispatch():
    calls = []

    def fake(x, tau, v_th, v_reset, alpha, detach_reset):
        calls.append((tau, v_th, v_reset, alpha, detach_reset))
        return torch.zeros_like(x)

    register_lif_backend("test-fake", fake)
    out = MultiStepLIF(v_threshold=0.5, backend="test-fake")(torch.ones(2, 3))
    assert calls == [(2.0, 0.5, 0.0, 4.0, True)] and not out.any()
    with pytest.raises(ValueError, match="unknown LIF backend 'nope'"):
        MultiStepLIF(backend="nope")(torch.ones(2, 3))
