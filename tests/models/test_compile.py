"""The model's fast paths: torch.compile (Inductor, CPU) gives the eager outputs; SSA's cheap order; bf16 autocast."""

from __future__ import annotations

import copy

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


# --------------------------------------------------------------------------------------------------
# Compile-clean training: zero graph breaks, fullgraph compile (issue 11)
# --------------------------------------------------------------------------------------------------


def _tiny_mim(encoder_path: str = "visible"):
    from models.mim import MaskedImageModel

    torch.manual_seed(0)
    encoder = models.create("spikformer_v2_tiny")
    return MaskedImageModel(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, encoder_path=encoder_path)


def test_pretraining_model_and_classifier_trace_without_graph_breaks():
    images = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    for model in (_tiny_mim().train(), models.create("spikformer_v2_tiny").train()):
        explanation = torch._dynamo.explain(model)(images)
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
        assert explanation.graph_count == 1
    # control: the boolean-indexing BatchNorm of the dense reference path does break the graph
    from models.spikformer import MaskedBatchNorm2d

    bn = MaskedBatchNorm2d(4).train()
    x, keep = torch.randn(2, 4, 5, 5), torch.rand(2, 1, 5, 5) < 0.5
    assert torch._dynamo.explain(bn.forward_indexed)(x, keep).graph_break_count > 0
    assert torch._dynamo.explain(bn)(x, keep).graph_break_count == 0
    torch._dynamo.reset()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: torch.nn.Module, expected: torch.nn.Module, rtol: float, scale_atol: float) -> None:
    g_got, g_exp = _grads(got), _grads(expected)
    assert g_got.keys() == g_exp.keys() and g_exp
    scale = max(g.abs().max().item() for g in g_exp.values())  # biases before a BN: zero up to rounding
    for name, g in g_exp.items():
        torch.testing.assert_close(g_got[name], g, rtol=rtol, atol=scale_atol * scale, msg=name)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_fullgraph_compile_forward_backward_matches_eager(kind):
    """fullgraph=True (an error on any graph break) through AOTAutograd: forward and backward graphs."""
    eager = _tiny_mim().train() if kind == "pretrain" else models.create("spikformer_v2_tiny").train()
    twin = copy.deepcopy(eager)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 3, 5, 9])

    def loss_of(model):
        if kind == "pretrain":
            torch.manual_seed(11)  # the same random mask in both runs
            return model(images)[0]
        return torch.nn.functional.cross_entropy(model(images), labels)

    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, dynamic=False, backend="aot_eager")
    loss_compiled = loss_of(compiled)
    loss_eager = loss_of(eager)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=0)
    loss_compiled.backward()
    loss_eager.backward()
    _assert_same_grads(twin, eager, rtol=1e-4, scale_atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_fullgraph_pretraining_step_matches_eager():
    eager = _tiny_mim().train()
    twin = copy.deepcopy(eager)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # eager's RNG: the same random mask
        compiled = torch.compile(twin, fullgraph=True, dynamic=False)
        torch.manual_seed(12)
        loss_compiled, _, mask_compiled = compiled(images)
    torch.manual_seed(12)
    loss_eager, _, mask_eager = eager(images)
    assert torch.equal(mask_compiled, mask_eager)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=0)
    loss_compiled.backward()
    loss_eager.backward()
    _assert_same_grads(twin, eager, rtol=1e-3, scale_atol=1e-4)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# SSA exact under bf16 (issue 11)
# --------------------------------------------------------------------------------------------------


def _dense_spikes(shape, rate: float, seed: int) -> torch.Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def test_spike_attention_is_exact_under_bf16_autocast():
    from models.spikformer import spike_attention

    shape = (1, 2, 2, 64, 1024)  # [T, B, heads, d, N]: K^T V counts ~ 256 +- 16, Q (K^T V) ~ 8000
    q, k, v = (_dense_spikes(shape, 0.5, seed) for seed in (1, 2, 3))
    exact = spike_attention(q.double(), k.double(), v.double(), 0.125)
    assert (k.double() @ v.double().transpose(-1, -2)).max() > 256  # the counts bf16 cannot hold
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = spike_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125)
        naive_kv = k @ v.transpose(-1, -2)  # what autocast does to a plain matmul
        naive = (naive_kv.transpose(-1, -2) @ q) * 0.125
    assert got.dtype == torch.float32 and torch.equal(got.double(), exact)
    # control: the plain products under autocast are bf16 and do round the counts
    assert naive.dtype == torch.bfloat16 and not torch.equal(naive.double(), exact)


def test_ssa_attention_spikes_under_bf16_equal_float32_arithmetic():
    """Given the Q/K/V spikes the bf16 run produced, its attention input and spikes are the exact ones."""
    torch.manual_seed(0)
    ssa = SSA(dim=128, num_heads=2).train()  # head dim 64
    with torch.no_grad():  # dense Q/K/V spikes (LIF at T = 1 fires for BN outputs >= 2): large counts
        for bn in (ssa.q_bn, ssa.k_bn, ssa.v_bn):
            bn.bias.fill_(2.5)
    x = _dense_spikes((1, 2, 128, 32, 32), 0.6, 4) * 2  # [T, B, C, H, W], N = 1024 tokens
    captured = {}
    for name in ("q_lif", "k_lif", "v_lif"):
        getattr(ssa, name).register_forward_hook(lambda m, i, out, name=name: captured.__setitem__(name, out))
    ssa.attn_lif.register_forward_hook(lambda m, i, out: captured.update(attn_in=i[0], attn_out=out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ssa(x)
    heads = (1, 2, 2, 64, 1024)
    q, k, v = (captured[f"{n}_lif"].double().reshape(heads) for n in "qkv")
    kv = k @ v.transpose(-1, -2)
    assert kv.max() > 256 and captured["attn_out"].any()
    exact = ((kv.transpose(-1, -2) @ q) * ssa.scale).reshape(1, 2, 128, 1024)
    assert captured["attn_in"].dtype == torch.float32
    assert torch.equal(captured["attn_in"].double(), exact)
    assert torch.equal(captured["attn_out"].double(), (exact >= 1.0).double())  # T = 1: V_th 0.5 at tau 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_graph_breaks_on_cuda_either():
    """On CUDA the "auto" LIF backend would launch the (compiler-opaque) Triton kernels; under
    torch.compile it traces the reference instead, which Inductor fuses."""
    images = torch.randn(2, 3, 32, 32, device="cuda")
    torch._dynamo.reset()
    for model in (_tiny_mim().cuda().train(), models.create("spikformer_v2_tiny").cuda().train()):
        assert torch._dynamo.explain(model)(images).graph_break_count == 0
    torch._dynamo.reset()
