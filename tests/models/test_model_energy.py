"""Energy accounting against a network whose spikes and operation counts are worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models.energy import (
    E_AC_PJ,
    E_MAC_PJ,
    EnergyMeter,
    FiringRateProbe,
    count_flops,
    firing_rates,
    measure_energy,
)
from models.neuron import MultiStepLIF


class HandNet(nn.Module):
    """image [B,1,4,4] -> repeat T=2 -> conv3x3 (1->2, identity and negation) -> LIF -> conv1x1 (2->3)
    -> mean over T and pixels -> head Linear(3->5)."""

    def __init__(self) -> None:
        super().__init__()
        self.T = 2
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.lif1 = MultiStepLIF()
        self.conv2 = nn.Conv2d(2, 3, 1)
        self.head = nn.Linear(3, 5)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[0, 0, 1, 1] = 1.0  # channel 0 = x
            self.conv1.weight[1, 0, 1, 1] = -1.0  # channel 1 = -x: never fires for x >= 0

    def forward(self, x):
        T, B = self.T, x.shape[0]
        y = self.conv1(x.unsqueeze(0).expand(T, *x.shape).flatten(0, 1))
        s = self.lif1(y.reshape(T, B, *y.shape[1:])).flatten(0, 1)
        z = self.conv2(s).reshape(T, B, 3, -1).mean(dim=(0, 3))
        return self.head(z)


def hand_images() -> torch.Tensor:
    """Image 0: two pixels of 3.0 (H = 1.5, 1.5: spike at both steps) and three of 1.5 (H = 0.75, then
    0.75 + 0.375 = 1.125: one spike) -> 7 spikes; image 1: all zero -> no spike."""
    images = torch.zeros(2, 1, 4, 4)
    images[0, 0, 0, 0] = images[0, 0, 3, 3] = 3.0
    images[0, 0, 1, 1] = images[0, 0, 2, 1] = images[0, 0, 1, 2] = 1.5
    return images


def test_hand_network_rates_flops_sops_energy():
    report = measure_energy(HandNet(), hand_images())
    rows = {r.layer: r for r in report.rows}
    assert list(rows) == ["conv1", "conv2", "head"]
    # FLOPs (MACs per image per time step): conv1 2 out ch * 16 px * 9 taps; conv2 3 * 16 * 2; head 3*5
    assert (rows["conv1"].flops, rows["conv2"].flops, rows["head"].flops) == (288, 96, 15)
    # LIF: 7 spikes over 2 images * T=2 * 2 channels * 16 px = 128 elements
    assert report.firing_rates == {"lif1": pytest.approx(7 / 128)}
    assert rows["conv2"].rate == pytest.approx(7 / 128)
    # SOPs per image = rate * T * FLOPs = 7/128 * 2 * 96 = 10.5
    assert rows["conv2"].sops == pytest.approx(10.5)
    assert rows["conv2"].pj == pytest.approx(E_AC_PJ * 10.5)
    # analog layers: the first conv at every time step (T * FLOPs MACs), the head once
    assert rows["conv1"].mac and rows["conv1"].rate is None and rows["conv1"].sops == 0
    assert rows["conv1"].pj == pytest.approx(E_MAC_PJ * 2 * 288)
    assert rows["head"].mac and rows["head"].pj == pytest.approx(E_MAC_PJ * 15)
    assert report.total_pj == pytest.approx(4.6 * 576 + 0.9 * 10.5 + 4.6 * 15)
    assert report.total_flops == 399 and report.T == 2 and report.images == 2
    assert "| conv2 | conv | 0.0547 | 96 | 10 | 9 |" in report.to_markdown()
    assert report.to_dict()["total_mj"] == pytest.approx(report.total_pj * 1e-9)


def test_meter_averages_over_batches_per_image():
    meter = EnergyMeter(HandNet())
    images = hand_images()
    meter.update(images[:1])  # 7 spikes / 64
    meter.update(images[1:])  # 0 spikes / 64
    meter.update(images[:1])  # 7 spikes / 64
    report = meter.report()
    assert report.images == 3
    assert report.firing_rates["lif1"] == pytest.approx(14 / 192)
    assert {r.layer: r.sops for r in report.rows}["conv2"] == pytest.approx(14 / 192 * 2 * 96)


def test_spikformer_attention_rows_use_k_and_q_rates():
    torch.manual_seed(0)
    model = models.create("spikformer_v2_tiny", T=2)
    images = torch.randn(4, 3, 32, 32)
    model.train()  # eval-mode rates of an untrained net are ~0; use batch statistics for a live check
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    report = measure_energy(model, images)
    rows = {r.layer: r for r in report.rows}
    d, dim, n = 16, 64, 64
    kv, qkv = rows["block.0.attn.kv"], rows["block.0.attn.qkv"]
    assert kv.flops == qkv.flops == n * d * dim
    assert kv.rate == pytest.approx(report.firing_rates["block.0.attn.k_lif"])
    assert qkv.rate == pytest.approx(report.firing_rates["block.0.attn.q_lif"])
    assert kv.sops == pytest.approx(kv.rate * 2 * kv.flops) and kv.rate > 0
    # inputs of the q/k/v convs are the stem's output stream (integers 0..2), averaged like spikes
    assert rows["block.0.attn.q_conv"].rate > 0
    assert [r.layer for r in report.rows if r.mac] == ["patch_embed.proj_conv", "head"]
    assert model.training  # the meter restores the mode
    assert set(firing_rates(model, images)) == set(report.firing_rates)


def test_count_flops_by_formula_and_on_meta_device():
    model = models.create("spikformer_v2_tiny")
    flops = count_flops(model, 32)
    assert flops["patch_embed.proj_conv"] == 8 * 32 * 32 * 3 * 9  # D/8 ch, no pooling yet
    assert flops["patch_embed.proj_conv3"] == 64 * 16 * 16 * 32 * 9  # after the first pool
    assert flops["patch_embed.extra3.0.conv"] == 64 * 8 * 8 * 64 * 9
    assert flops["block.0.attn.q_conv"] == 64 * 64 * 64  # D x D per token, 64 tokens
    assert flops["block.0.attn.kv"] == flops["block.0.attn.qkv"] == 64 * 16 * 64
    assert flops["block.1.mlp.fc1_conv"] == 64 * 256 * 64
    assert flops["head"] == 64 * 10
    assert model.T == 1 and model.training
    with torch.device("meta"):
        big = models.create("spikformer_v1_8_512")
    # ~8.36 GMACs; the Spikformer paper lists 8.33G FLOPs for the ANN Transformer-8-512 (MAC convention)
    assert sum(count_flops(big, 224).values()) == pytest.approx(8.36e9, rel=0.001)


def test_probe_records_rates_of_the_callers_own_forward_passes():
    model = HandNet().train()
    images = hand_images()
    with FiringRateProbe(model) as probe:
        model(images[:1]).sum().backward()  # gradients still flow: the probe only reads
        model(images)
    assert probe.rates() == {"lif1": pytest.approx((7 + 7) / (64 + 128))}
    model(images)  # hooks are gone after the block
    assert probe.rates()["lif1"] == pytest.approx(14 / 192)
