"""Ablation variants selected by create_model kwargs: attention "ssa"/"softmax", stem "scs"/"sps", any T,
neuron "lif"/"relu" (the no-LIF control)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import models
from models.energy import count_flops, measure_energy
from models.mim import MaskedImageModel
from models.neuron import MultiStepLIF, Rectifier
from models.spikformer import SSA, SoftmaxSelfAttention, Spikformer
from models.summary import count_params

pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = [
    {"attention": "softmax"},
    {"stem": "sps"},
    {"attention": "softmax", "stem": "sps", "T": 2},
    {"neuron": "relu"},
]


def test_defaults_are_ssa_and_scs_and_softmax_keeps_the_parameters():
    default = models.create("spikformer_v2_8_512", device="meta")
    assert default.attention == "ssa" and default.stem_type == "scs"
    assert isinstance(default.block[0].attn, SSA)
    softmax = models.create("spikformer_v2_8_512", attention="softmax", device="meta")
    assert isinstance(softmax.block[0].attn, SoftmaxSelfAttention)
    # the same parameters under the same names: SSA's neurons have none
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (softmax, default)]
    assert shapes[0] == shapes[1]
    assert count_params(softmax) == count_params(default)
    sps = models.create("spikformer_v2_8_512", stem="sps", device="meta")
    assert count_params(sps) == count_params(models.create("spikformer_v1_8_512", device="meta"))


def test_unknown_attention_is_rejected():
    with pytest.raises(ValueError, match=r"attention must be one of \('ssa', 'softmax'\), got 'linear'"):
        models.create("spikformer_v2_tiny", attention="linear")


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_variant_trains_a_step_and_round_trips_its_state_dict(kwargs, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("spikformer_v2_tiny", **kwargs).train()
    assert model.T == kwargs.get("T", 1)
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([1, 2, 3, 4])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = copy.deepcopy(model.state_dict())
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.block[0].attn.q_conv.weight.grad.abs().sum() > 0  # the attention branch learns
    optimizer.step()
    assert not torch.equal(before["block.0.attn.q_conv.weight"], model.state_dict()["block.0.attn.q_conv.weight"])

    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = timm.create_model("spikformer_v2_tiny", **kwargs)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_variant_pretrains_through_mim_and_exports_its_encoder(kwargs):
    torch.manual_seed(0)
    encoder = timm.create_model("spikformer_v2_tiny", num_classes=0, **kwargs)
    mim = MaskedImageModel(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2).train()
    optimizer = torch.optim.AdamW([p for p in mim.parameters() if p.requires_grad], lr=1e-3)
    loss, _, _ = mim(torch.randn(4, 3, 32, 32))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and mim.encoder.block[0].attn.v_conv.weight.grad.abs().sum() > 0
    classifier = timm.create_model("spikformer_v2_tiny", **kwargs)
    result = classifier.load_state_dict(mim.encoder_state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and result.unexpected_keys == []


def test_softmax_attention_fast_path_equals_the_dense_reference():
    """Under a mask, the dense path excludes masked keys from the softmax: same function as gathering."""
    torch.manual_seed(0)
    encoder = models.create("spikformer_v2_tiny", attention="softmax", T=2)
    fast = MaskedImageModel(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2).double().train()
    reference = copy.deepcopy(fast)
    reference.encoder_path = "dense"
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    mask = fast.random_mask(3, "cpu", generator=torch.Generator().manual_seed(1))
    loss_fast, loss_ref = fast(images, mask)[0], reference(images, mask)[0]
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-10, atol=0)
    loss_fast.backward()
    loss_ref.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    scale = max(g.abs().max().item() for g in grads.values())
    for name, p in fast.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-8, atol=1e-12 * scale, msg=name)


def test_softmax_attention_is_counted_as_macs():
    torch.manual_seed(0)
    model = models.create("spikformer_v2_tiny", attention="softmax")
    flops = count_flops(model, 32)
    assert flops["block.0.attn.qk"] == flops["block.0.attn.av"] == 64 * 64 * 64  # N^2 D, N = 64 tokens, D = 64
    report = measure_energy(model, torch.randn(2, 3, 32, 32))
    rows = {r.layer: r for r in report.rows}
    assert rows["block.0.attn.qk"].mac and rows["block.0.attn.proj_conv"].mac
    assert not rows["block.0.attn.q_conv"].mac  # its input is the spike-count residual stream
    assert "block.0.attn.q_lif" not in report.firing_rates  # no neurons on Q, K, V


def test_softmax_attention_is_real_valued_attention():
    """Its output before the projection is softmax(Q K^T / sqrt(d)) V of the real-valued BN outputs."""
    torch.manual_seed(0)
    attn = SoftmaxSelfAttention(dim=16, num_heads=2).double().eval()
    x = torch.rand(1, 2, 16, 3, 3, dtype=torch.float64)
    captured = {}
    attn.proj_conv.register_forward_pre_hook(lambda m, args: captured.__setitem__("in", args[0]))
    with torch.no_grad():
        attn(x)
        rows = x.flatten(3).flatten(0, 1)
        q, k, v = (getattr(attn, f"{n}_bn")(getattr(attn, f"{n}_conv")(rows)).reshape(2, 2, 8, 9) for n in "qkv")
        weights = torch.softmax(q.transpose(-1, -2) @ k / 8**0.5, dim=-1)  # [TB, h, N, N]
        expected = (weights @ v.transpose(-1, -2)).transpose(-1, -2).reshape(2, 16, 9)
    torch.testing.assert_close(captured["in"], expected)
    assert not torch.equal(expected, expected.round())  # real-valued, not spike counts


def test_any_T_and_the_sps_stem_through_the_constructor():
    model = Spikformer(img_size=32, embed_dim=32, depth=1, num_heads=2, T=3, stem="sps", stem_pools=2,
                       attention="softmax", num_classes=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_the_no_lif_control_swaps_every_neuron_and_keeps_the_parameters():
    spiking = models.create("spikformer_v2_tiny")
    control = models.create("spikformer_v2_tiny", neuron="relu")
    lifs = [n for n, m in spiking.named_modules() if isinstance(m, MultiStepLIF)]
    assert len(lifs) == 20  # stem 6 (4 stages, the SCS unit, the RPE) + 2 blocks x 7 (q, k, v, attn, proj, fc1, fc2)
    assert [n for n, m in control.named_modules() if isinstance(m, Rectifier)] == lifs
    assert not any(isinstance(m, MultiStepLIF) for m in control.modules())
    assert spiking.neuron == "lif" and control.neuron == "relu"
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (control, spiking)]
    assert shapes[0] == shapes[1]  # checkpoints of one load into the other's architecture


def test_the_no_lif_control_is_real_valued_and_spiking_is_binary():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    outputs = {}
    for neuron in ("lif", "relu"):
        torch.manual_seed(0)
        model = models.create("spikformer_v2_tiny", neuron=neuron).train()  # BN on batch statistics
        model.block[0].mlp.fc1_lif.register_forward_hook(lambda m, a, out, n=neuron: outputs.__setitem__(n, out))
        with torch.no_grad():
            model(x)
    assert set(outputs["lif"].unique().tolist()) == {0.0, 1.0}  # the MLP's first neuron: spikes...
    relu_out = outputs["relu"]
    assert relu_out.min() == 0 and not torch.equal(relu_out, relu_out.round())  # ...or max(x, 0) of real values


def test_rectifier_is_max_x_0_with_its_gradient():
    x = torch.tensor([-1.5, 0.0, 0.25, 3.0], requires_grad=True)
    y = Rectifier()(x)
    assert torch.equal(y, torch.tensor([0.0, 0.0, 0.25, 3.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 1.0, 1.0]))  # 0 at 0, as ReLU


def test_unknown_neuron_is_rejected():
    with pytest.raises(ValueError, match=r"neuron must be one of \('lif', 'relu'\), got 'gelu'"):
        models.create("spikformer_v2_tiny", neuron="gelu")


def test_the_no_lif_control_is_charged_as_macs_everywhere():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    spiking = measure_energy(models.create("spikformer_v2_tiny").eval(), images)
    torch.manual_seed(0)
    control = measure_energy(models.create("spikformer_v2_tiny", neuron="relu").eval(), images)
    assert control.firing_rates == {}  # no spikes to count
    assert control.rows and all(r.mac and r.sops == 0 for r in control.rows)
    assert {r.layer for r in control.rows} == {r.layer for r in spiking.rows}  # same layers, attention included
    # every MAC row costs E_MAC * FLOPs per time step: the whole network at 4.6 pJ per operation
    assert control.total_pj == pytest.approx(4.6 * sum(r.flops for r in control.rows), rel=1e-9)
    assert control.total_pj > 3 * spiking.total_pj

