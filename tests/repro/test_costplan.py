"""The cost plan: the model's FLOP count against a hand count, ZeRO memory against the paper's
formulas, steps and shards from a real manifest, and the `plan` command's table."""

from __future__ import annotations

import math

import pytest

from pipeline.config import load_job
from pipeline.costplan import Cluster, measure_model, plan_stage, zero_memory
from pipeline.errors import PipelineError

from .conftest import REPO, toy_overrides


def tiny_macs_by_hand() -> int:
    """spikformer_v2_tiny at 32 px: D = 64, 4 heads, 2 blocks, stem widths 8/16/32/64 with the last two
    stages pooling (stride 4 -> 8x8 = 64 tokens), one supplementary SCS conv on the token grid, 10 classes."""
    conv3 = lambda hw, cin, cout: hw * hw * cout * cin * 9  # noqa: E731 - MACs of a 3x3 conv, stride 1
    stem = (conv3(32, 3, 8) + conv3(32, 8, 16) + conv3(32, 16, 32)  # stage 2 pools after its conv
            + conv3(16, 32, 64)                                   # stage 3 at 16x16, then pools to 8x8
            + conv3(8, 64, 64) + conv3(8, 64, 64))                # SCS extra conv + relative-position conv
    tokens, dim, head_dim = 64, 64, 16
    qkv_proj = 4 * tokens * dim * dim
    attention = 2 * tokens * head_dim * dim  # K^T V and Q (K^T V), all heads
    mlp = 2 * tokens * dim * 4 * dim
    return stem + 2 * (qkv_proj + attention + mlp) + dim * 10


def toy_job(tmp_path, *extra: str):
    return load_job(REPO / "jobs/reproduce_81.yaml", [*toy_overrides(tmp_path, None), *extra])


def test_model_flops_match_a_hand_count(tmp_path):
    job = toy_job(tmp_path, "stages.finetune.T=2")
    cost = measure_model(job, "finetune")
    assert cost.encoder_macs == tiny_macs_by_hand() == 22_110_848
    assert cost.decoder_macs == 0
    stage = plan_stage(job, "finetune", Cluster(gpus=2))
    assert stage.forward_flops_per_image == 2 * 2 * tiny_macs_by_hand()  # 2 FLOPs per MAC, T = 2
    assert stage.flops_per_image == 3 * stage.forward_flops_per_image


def test_mim_decoder_flops_by_hand(tmp_path):
    job = toy_job(tmp_path, "stages.pretrain.decoder_dim=32", "stages.pretrain.decoder_depth=2")
    cost = measure_model(job, "pretrain")
    L, w, enc, pix = 64, 32, 64, 4 * 4 * 3  # 8x8 patches of 4 px (the stem stride)
    visible = L - round(L * job.stages.pretrain.mask_ratio)  # the encoder hands over visible tokens only
    block = L * w * 3 * w + 2 * L * L * w + L * w * w + 2 * L * w * 4 * w  # qkv, QK^T+AV, proj, MLP
    assert cost.decoder_macs == visible * enc * w + 2 * block + L * w * pix
    # the encoder runs its stem densely and its token-grid layers and blocks on visible tokens only:
    # less than the classifier's dense count (which has no head here), more than its visible share
    dense = tiny_macs_by_hand() - 64 * 10
    assert dense * visible / L < cost.encoder_macs < dense


@pytest.mark.parametrize("stage,expected", [
    (0, (2, 2, 12)), (1, (2, 2, 12 / 8)), (2, (2, 2 / 8, 12 / 8)), (3, (2 / 8, 2 / 8, 12 / 8)),
])
def test_zero_memory_follows_the_zero_paper(stage, expected):
    psi = 7_500_000_000  # the ZeRO paper's 7.5B example: 120 GB at stage 0, 31.4 / 16.6 / 1.9 GB over 64 GPUs
    mem = zero_memory(1000, stage, 8, "bf16")
    assert (mem.params, mem.grads, mem.optimizer) == pytest.approx(tuple(1000 * b for b in expected))
    paper_gb = {0: 120, 1: 31.4, 2: 16.6, 3: 1.9}[stage]
    assert zero_memory(psi, stage, 64, "bf16").total / 1e9 == pytest.approx(paper_gb, rel=0.02)


def test_zero_memory_fp32_and_errors():
    assert zero_memory(10, 0, 4, "fp32").total == 10 * (4 + 4 + 8)
    assert zero_memory(10, 2, 4, "fp32").grads == 10
    with pytest.raises(PipelineError, match="zero_stage"):
        zero_memory(10, 4, 4, "bf16")


def test_plan_stage_uses_the_manifest_and_scales_activations(tmp_path, digits_manifests):
    from pipeline.data.manifest import load_manifest

    sets = [f"data.train={digits_manifests['train']}", f"data.val={digits_manifests['val']}",
            f"data.pretrain={digits_manifests['train']}"]
    job = load_job(REPO / "jobs/reproduce_81.yaml", [*toy_overrides(tmp_path, None), *sets,
                                                      "stages.finetune.max_steps=null", "stages.finetune.epochs=3"])
    train = load_manifest(digits_manifests["train"])
    cluster = Cluster(gpus=2, gpu_tflops=100, mfu=0.5)
    stage = plan_stage(job, "finetune", cluster)
    per_epoch = train.num_samples // (8 * 2)
    assert (stage.data.samples, stage.data.shards) == (train.num_samples, len(train.shards))
    assert stage.data.bytes == sum(s.bytes for s in train.shards)
    assert stage.steps == 3 * per_epoch and stage.global_batch == 16
    assert stage.total_flops == stage.flops_per_image * stage.steps * 16
    assert stage.wall_hours == pytest.approx(stage.total_flops / (2 * 100e12 * 0.5) / 3600)
    assert stage.gpu_hours == pytest.approx(2 * stage.wall_hours)
    doubled = plan_stage(load_job(REPO / "jobs/reproduce_81.yaml", [*toy_overrides(tmp_path, None), *sets,
                                                                    "stages.finetune.batch_size=16"]),
                         "finetune", cluster)
    assert doubled.activation_bytes == pytest.approx(2 * stage.activation_bytes) and stage.activation_bytes > 0
    # checkpoint: fp32 weights + Adam moments (8 bytes) + EMA copy (the spec enables EMA)
    assert stage.checkpoint_bytes == stage.model.params * (4 + 8) + 4 * stage.model.params


def test_plan_command_prints_the_cost_table_for_imagenet(tmp_path, capsys, monkeypatch):
    from pipeline.__main__ import main

    monkeypatch.delenv("SHARDS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("SHARDS", str(tmp_path / "no-shards-yet"))
    # before the shards exist the plan is printed in full, then names the manifests it could not check (exit 2)
    assert main(["plan", str(REPO / "jobs/supervised_80.yaml"), "--gpus", "16", "--gpu-tflops", "989",
                 "--mfu", "0.25"]) == 2
    out, err = capsys.readouterr()
    assert "could not be checked: data.train:" in err and "no-shards-yet/train.manifest.json" in err
    assert "assumed ImageNet-1k" in out and "1,281,167" in out
    steps = math.ceil(310 * (1_281_167 // (16 * 16)))
    assert f"{steps:,} / 310" in out
    assert "finetune (T=4, bf16, ZeRO-1)" in out and "wall time" in out and "memory/GPU optimizer" in out


def test_without_mfu_the_plan_uses_the_measured_mfu_per_stage_and_names_its_source(tmp_path, capsys,
                                                                                     monkeypatch):
    from pipeline.__main__ import main
    from pipeline.costplan import MEASURED_MFU, MEASURED_MFU_SOURCE

    measured = Cluster(gpus=2, gpu_tflops=100)
    job = toy_job(tmp_path)
    assert measured.mfu_for("evaluate") == measured.mfu_for("probe") == MEASURED_MFU["finetune"]
    for stage in ("pretrain", "finetune"):
        cost, at_half = plan_stage(job, stage, measured), plan_stage(job, stage, Cluster(gpus=2, gpu_tflops=100,
                                                                                         mfu=0.5))
        mfu = MEASURED_MFU.get(stage, MEASURED_MFU["finetune"])
        assert cost.wall_hours == pytest.approx(at_half.wall_hours * 0.5 / mfu)  # time scales as 1/MFU
    assert MEASURED_MFU["pretrain"] != MEASURED_MFU["finetune"]  # so the per-stage choice is visible above

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("SHARDS", str(tmp_path / "no-shards-yet"))
    assert main(["plan", str(REPO / "jobs/supervised_80.yaml"), "--gpu-tflops", "989"]) == 2  # no shards yet
    out = capsys.readouterr().out
    assert "MFU as measured (pretrain 0.228, finetune 0.262" in out and MEASURED_MFU_SOURCE in out


def test_activation_estimate_on_meta_equals_a_real_forward_and_scales_with_T(tmp_path):
    import timm
    import torch

    from pipeline.costplan import build_stage_model, saved_activation_bytes

    job = toy_job(tmp_path, "stages.finetune.T=2")
    meta = saved_activation_bytes(build_stage_model(job, "finetune"), 32)
    torch.manual_seed(0)
    real = timm.create_model("spikformer_v2_tiny", img_size=32, num_classes=10, T=2, drop_path_rate=0.1)
    assert meta == saved_activation_bytes(real, 32) > 0  # the meta device saves the same tensors
    by_T = {T: saved_activation_bytes(build_stage_model(toy_job(tmp_path, f"stages.finetune.T={T}"), "finetune"), 32)
            for T in (1, 4)}
    # BPTT keeps every time step: each step beyond the first saves the same tensors again
    assert by_T[4] - meta == 2 * (meta - by_T[1]) > 0
