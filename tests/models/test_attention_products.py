"""Spiking attention's products as bf16 GEMMs (tensor cores) with float32 accumulation and output: exact.

Q, K, V are 0/1 and K^T V holds counts <= N, so every bf16 operand is exact while N <= 256; the float32
reference (``products="fp32"``) and float64 are the oracles. Shapes of spikformer_v2_16_768 at 224 px:
12 heads of d = 64, N = 196 tokens (finetuning) or 78 visible ones (MIM, mask 0.6).
"""

from __future__ import annotations

import pytest
import torch

from models.spikformer import BF16_EXACT_COUNT, SSA, spike_attention

SHAPES = {"finetune": (1, 2, 12, 64, 196), "pretrain": (1, 2, 12, 64, 78)}  # [T, B, heads, d, N]


def _spikes(shape, rate: float, seed: int, device="cpu") -> torch.Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float().to(device)


def _qkv(shape, rate: float, device="cpu"):
    return [_spikes(shape, rate, seed, device) for seed in (1, 2, 3)]


@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
@pytest.mark.parametrize("rate", [0.2, 0.97])
def test_bf16_products_equal_float64_at_the_172m_shapes(kind, rate):
    q, k, v = _qkv(SHAPES[kind], rate)
    exact = spike_attention(q.double(), k.double(), v.double(), 0.125)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = spike_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125, products="bf16")
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.equal(got.double(), exact)
    if rate > 0.5:  # the counts reach nearly N (196 at most here: the top of the exact range)
        assert (k.double() @ v.double().transpose(-1, -2)).max() > 0.9 * q.shape[-1]


def test_bf16_products_round_when_counts_pass_256_and_auto_falls_back():
    n = 400  # K^T V counts ~ 380 at 97% firing: not bf16 numbers
    q, k, v = _qkv((1, 1, 2, 64, n), 0.97)
    exact = spike_attention(q.double(), k.double(), v.double(), 0.125)
    assert (k @ v.transpose(-1, -2)).max() > BF16_EXACT_COUNT
    rounded = spike_attention(q, k, v, 0.125, products="bf16")
    assert not torch.equal(rounded.double(), exact)  # control: the bf16 operand did round
    assert torch.equal(spike_attention(q, k, v, 0.125).double(), exact)  # auto: float32 on the CPU anyway


def test_auto_picks_bf16_on_a_gpu_only_while_exact():
    # the choice itself, on the meta device standing in for a GPU's tensors: bmm's out_dtype overload
    # (the GPU kernel) runs there; the float32 path's matmuls would give float32 too, so look at the graph
    q = torch.empty(1, 2, 12, 64, 196, device="meta", requires_grad=True)
    out = spike_attention(q, q, q, 0.125)
    assert out.dtype == torch.float32 and out.shape == q.shape
    q_long = torch.empty(1, 1, 2, 64, BF16_EXACT_COUNT + 1, device="meta", requires_grad=True)
    assert "SpikeProduct" not in _grad_fns(spike_attention(q_long, q_long, q_long, 0.125))
    # meta tensors are FLOP counting, not a GPU: "auto" keeps the reference there
    assert "SpikeProduct" not in _grad_fns(out)
    forced = spike_attention(q, q, q, 0.125, products="bf16")
    assert "_SpikeProductBackward" in _grad_fns(forced)
    forced.sum().backward()  # the out_dtype GEMM's gradients: bf16 GEMMs, cast back to the input's dtype
    assert q.grad.dtype == torch.float32 and q.grad.shape == q.shape
    with pytest.raises(ValueError, match="products"):
        spike_attention(q, q, q, 0.125, products="fp16")


def _grad_fns(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``t``."""
    seen, todo = {}, [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn  # held: a freed node's id could come back for another one
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return {fn.name() for fn in seen.values()}


def test_bf16_product_gradients_follow_the_float32_reference():
    q, k, v = (x.requires_grad_() for x in _qkv((1, 2, 2, 16, 49), 0.3))
    upstream = torch.randn(1, 2, 2, 16, 49, generator=torch.Generator().manual_seed(4))
    reference = torch.autograd.grad((spike_attention(q, k, v, 0.125, "fp32") * upstream).sum(), (q, k, v))
    got = torch.autograd.grad((spike_attention(q, k, v, 0.125, "bf16") * upstream).sum(), (q, k, v))
    for g, ref in zip(got, reference, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())  # bf16 gradients


def test_bf16_products_compile_to_one_graph_with_the_eager_values():
    q, k, v = (x.requires_grad_() for x in _qkv((1, 2, 2, 16, 49), 0.4))

    def loss(q, k, v):
        return spike_attention(q, k, v, 0.125, "bf16").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)  # fullgraph: an error on any break
    expected, got = loss(q, k, v), compiled(q, k, v)
    assert torch.equal(got, expected)
    for g, ref in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(expected, (q, k, v)), strict=True):
        torch.testing.assert_close(g, ref)
    # the GPU's kernel (bmm with out_dtype) traces too: on the meta device, forward and backward graphs
    meta = torch.empty(1, 2, 12, 64, 196, device="meta", requires_grad=True)
    compiled(meta, meta, meta).backward()
    assert meta.grad.shape == meta.shape
    torch._dynamo.reset()


def test_ssa_products_setting_is_checked_and_reaches_the_products():
    ssa = SSA(dim=32, num_heads=2, products="bf16").train()
    x = _spikes((1, 2, 32, 4, 4), 0.5, 5)
    assert "_SpikeProductBackward" in _grad_fns(ssa(x.requires_grad_()))
    with pytest.raises(ValueError, match="products"):
        SSA(dim=32, num_heads=2, products="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_tensor_core_products_on_cuda_equal_float64(kind):
    q, k, v = _qkv(SHAPES[kind], 0.97, device="cuda")
    exact = spike_attention(q.double(), k.double(), v.double(), 0.125)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = spike_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125)  # auto: the bf16 GEMMs
    assert got.dtype == torch.float32 and torch.equal(got.double(), exact)
    q.requires_grad_()
    assert "_SpikeProductBackward" in _grad_fns(spike_attention(q, k, v, 0.125))
