"""Fused Triton LIF against the PyTorch reference, on CPU through the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import models  # noqa: E402
from models import lif_triton  # noqa: E402
from models.neuron import MultiStepLIF, lif_multistep, lif_multistep_reference  # noqa: E402

# (v_reset, detach_reset): hard reset to 0 (Spikformer), soft reset, hard reset to a non-zero value,
# and the reset inside the graph
SETTINGS = [(0.0, True), (None, True), (-0.5, True), (0.0, False), (None, False)]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _upstream_grad(spikes: torch.Tensor) -> torch.Tensor:
    """A fixed random upstream gradient like ``spikes``: drawn on the CPU (the same numbers on every
    device), then placed on the spikes' device and dtype (backward refuses a gradient elsewhere)."""
    grad = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(1))
    return grad.to(device=spikes.device, dtype=spikes.dtype)


def _both(x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spikes and input gradients of the reference and the fused path for one random upstream gradient."""
    args = (kwargs.get("tau", 2.0), kwargs.get("v_threshold", 1.0), kwargs.get("v_reset", 0.0),
            kwargs.get("alpha", 4.0), kwargs.get("detach_reset", True))
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    s_ref = lif_multistep_reference(x_ref, *args)
    s_fused = lif_triton.lif_multistep_triton(x_fused, *args)
    grad = _upstream_grad(s_ref)
    s_ref.backward(grad)
    s_fused.backward(grad)
    return s_ref, s_fused, x_ref.grad, x_fused.grad


@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize(("v_reset", "detach_reset"), SETTINGS)
def test_fused_matches_reference_fp32(T, v_reset, detach_reset):
    # 3 x 401 = 1203 neurons: two programs, the second one partly masked
    x = torch.randn(T, 3, 401, generator=torch.Generator().manual_seed(T)) * 1.5
    s_ref, s_fused, g_ref, g_fused = _both(x, v_reset=v_reset, detach_reset=detach_reset)
    assert s_fused.dtype == x.dtype and s_fused.shape == x.shape
    assert torch.equal(s_fused, s_ref)
    assert 0 < s_ref.mean() < 1  # both spiking and silent neurons are exercised
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 1, 1), (2, 5, 3, 7), (3, 2, 1, 9, 5)])
def test_fused_odd_shapes_and_parameters(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2
    s_ref, s_fused, g_ref, g_fused = _both(x, tau=1.7, v_threshold=0.3, alpha=2.5)
    assert torch.equal(s_fused, s_ref)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision(T, dtype):
    x = (torch.randn(T, 7, 129, generator=torch.Generator().manual_seed(3)) * 1.5).to(dtype)
    s_ref, s_fused, g_ref, g_fused = _both(x)
    assert s_fused.dtype == dtype
    # the charge is rounded to the input dtype after every op like PyTorch's, so spikes still agree
    assert torch.equal(s_fused, s_ref)
    # gradients: float32 inside the kernel, rounded once; the reference rounds after every op
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(g_fused.float(), g_ref.float(), rtol=tol, atol=tol)


def test_fused_non_contiguous_input():
    x = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(4)).transpose(1, 2)
    s_ref, s_fused, g_ref, g_fused = _both(x)
    assert torch.equal(s_fused, s_ref)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-6)


def test_fused_stores_one_value_per_element():
    x = torch.randn(4, 2, 33, dtype=torch.bfloat16, requires_grad=True)
    out = lif_triton.lif_multistep_triton(x, 2.0, 1.0, 0.0, 4.0, True)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1
    assert saved[0].shape == x.shape and saved[0].dtype == x.dtype


def test_upstream_gradient_follows_the_input_device_and_dtype():
    # the CUDA cases once built it on the CPU ("invalid gradient ... expected device cuda:0 but got
    # cpu"); the meta device stands in for a GPU here
    for like in (torch.empty(2, 3, device="meta", dtype=torch.bfloat16), torch.zeros(2, 3)):
        grad = _upstream_grad(like)
        assert (grad.device, grad.dtype, grad.shape) == (like.device, like.dtype, like.shape)
    # the same numbers whatever the device
    wide = _upstream_grad(torch.zeros(4, 5, dtype=torch.float64))
    assert torch.equal(wide.float(), _upstream_grad(torch.zeros(4, 5)))


def test_auto_backend_uses_reference_on_cpu_and_triton_needs_cuda(monkeypatch):
    assert MultiStepLIF().backend == "auto"
    x = torch.randn(2, 3, 5)
    assert torch.equal(lif_multistep(x), lif_multistep_reference(x, 2.0, 1.0, 0.0, 4.0, True))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not lif_triton.can_run(x)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        lif_multistep(x, backend="triton")
    assert not lif_triton.can_run(torch.randn(2, 3, dtype=torch.float64))


def test_tiny_model_with_fused_neurons_matches_reference():
    torch.manual_seed(0)
    ref = models.create("spikformer_v2_tiny", T=2, lif_kwargs={"backend": "torch"})
    fused = models.create("spikformer_v2_tiny", T=2, lif_kwargs={"backend": "triton"})
    fused.load_state_dict(ref.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out_ref, out_fused = ref(images), fused(images)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA device")
@pytest.mark.parametrize("T", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_cuda_match_reference(monkeypatch, T, dtype):
    monkeypatch.delenv("TRITON_INTERPRET")
    x = (torch.randn(T, 5, 3001, generator=torch.Generator().manual_seed(T)) * 1.5).to(dtype).cuda()
    s_ref, s_fused, g_ref, g_fused = _both(x)
    assert torch.equal(s_fused, s_ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(g_fused.float(), g_ref.float(), rtol=tol, atol=tol)
    # the default backend picks the fused kernels for CUDA tensors
    assert lif_multistep(x.detach().requires_grad_()).grad_fn.name() == "FusedLIFBackward"
