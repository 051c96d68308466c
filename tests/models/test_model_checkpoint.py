"""Loading checkpoints of the official Spikformer V1 ImageNet code by name."""

from __future__ import annotations

import argparse

import pytest
import torch

import models
from models import CheckpointMismatchError, load_spikformer_v1_checkpoint


def official_v1_shapes(depth: int, dim: int, classes: int, in_chans: int = 3) -> dict[str, tuple]:
    """Key -> shape of the official imagenet/model.py Spikformer state_dict (written from its layer list,
    independently of our classes), including the unused norm1/norm2 LayerNorms and BN buffers."""
    shapes: dict[str, tuple] = {}

    def bn(prefix, c):
        shapes.update(
            {
                f"{prefix}.weight": (c,),
                f"{prefix}.bias": (c,),
                f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,),
                f"{prefix}.num_batches_tracked": (),
            }
        )

    prev = in_chans
    for k, width in enumerate((dim // 8, dim // 4, dim // 2, dim)):
        suffix = "" if k == 0 else str(k)
        shapes[f"patch_embed.proj_conv{suffix}.weight"] = (width, prev, 3, 3)
        bn(f"patch_embed.proj_bn{suffix}", width)
        prev = width
    shapes["patch_embed.rpe_conv.weight"] = (dim, dim, 3, 3)
    bn("patch_embed.rpe_bn", dim)
    for i in range(depth):
        p = f"block.{i}"
        for norm in ("norm1", "norm2"):
            shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (dim,)
        for name in ("q", "k", "v"):
            shapes[f"{p}.attn.{name}_conv.weight"] = (dim, dim, 1)
            bn(f"{p}.attn.{name}_bn", dim)
        shapes[f"{p}.attn.proj_conv.weight"] = (dim, dim, 1)
        shapes[f"{p}.attn.proj_conv.bias"] = (dim,)
        bn(f"{p}.attn.proj_bn", dim)
        shapes[f"{p}.mlp.fc1_conv.weight"] = (4 * dim, dim, 1, 1)
        shapes[f"{p}.mlp.fc1_conv.bias"] = (4 * dim,)
        bn(f"{p}.mlp.fc1_bn", 4 * dim)
        shapes[f"{p}.mlp.fc2_conv.weight"] = (dim, 4 * dim, 1, 1)
        shapes[f"{p}.mlp.fc2_conv.bias"] = (dim,)
        bn(f"{p}.mlp.fc2_bn", dim)
    shapes["head.weight"] = (classes, dim)
    shapes["head.bias"] = (classes,)
    return shapes


def official_state_dict(depth=2, dim=64, classes=10, prefix="") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, shape in official_v1_shapes(depth, dim, classes).items():
        if key.endswith("num_batches_tracked"):
            out[prefix + key] = torch.tensor(1234)
        else:
            out[prefix + key] = torch.randn(shape, generator=gen)
    return out


def small_v1(**kwargs):
    return models.Spikformer(embed_dim=64, depth=2, num_heads=2, num_classes=10, stem="sps", **kwargs)


def assert_loaded(model, state):
    own = model.state_dict()
    for key, value in state.items():
        key = key.removeprefix("module.")
        if ".norm1." in key or ".norm2." in key:
            continue
        assert torch.equal(own[key], value), key


def test_official_key_set_matches_our_v1_model_exactly():
    official = {k for k in official_v1_shapes(8, 512, 1000) if ".norm1." not in k and ".norm2." not in k}
    with torch.device("meta"):
        ours = models.create("spikformer_v1_8_512").state_dict()
    assert set(ours) == official
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: v for k, v in official_v1_shapes(8, 512, 1000).items() if k in official
    }


def test_bare_state_dict_loads():
    state = official_state_dict()
    model = small_v1()
    assert load_spikformer_v1_checkpoint(model, state) == []
    assert_loaded(model, state)


def test_timm_train_checkpoint_file_with_module_prefix_loads(tmp_path):
    state = official_state_dict(prefix="module.")
    path = tmp_path / "checkpoint-309.pth.tar"
    torch.save(
        {
            "epoch": 309,
            "arch": "spikformer",
            "state_dict": state,
            "optimizer": {"state": {}},
            "version": 2,
            "args": argparse.Namespace(lr=5e-4, model="spikformer"),
            "metric": 73.38,
        },
        path,
    )
    model = small_v1()
    load_spikformer_v1_checkpoint(model, path)
    assert_loaded(model, state)
    # the same content without the file, in the {"state_dict": ...} wrapper
    other = small_v1()
    load_spikformer_v1_checkpoint(other, {"state_dict": state, "epoch": 3})
    assert_loaded(other, state)


def test_unexpected_key_is_reported_by_name():
    state = official_state_dict()
    state["block.0.attn.res_attn.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match=r"unexpected keys: \['block.0.attn.res_attn.weight'\]"):
        load_spikformer_v1_checkpoint(small_v1(), state)


def test_missing_key_is_reported_by_name_and_nothing_is_loaded():
    state = official_state_dict()
    del state["block.1.mlp.fc2_conv.bias"]
    model = small_v1()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: \['block.1.mlp.fc2_conv.bias'\]"):
        load_spikformer_v1_checkpoint(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_mismatch_is_reported_by_name():
    state = official_state_dict(classes=1000)
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(1000, 64\) vs model \(10, 64\)"):
        load_spikformer_v1_checkpoint(small_v1(), state)
    # a new head for finetuning: drop the checkpoint's head on purpose
    model = small_v1()
    assert load_spikformer_v1_checkpoint(model, state, ignore=[r"^head\."]) == []
    torch.testing.assert_close(model.patch_embed.proj_conv.weight, state["patch_embed.proj_conv.weight"])


def test_v1_weights_into_a_v2_model_need_strict_false():
    state = official_state_dict()
    v2 = models.Spikformer(embed_dim=64, depth=2, num_heads=2, num_classes=10, stem="scs")
    with pytest.raises(KeyError, match="patch_embed.extra3.0.conv.weight"):
        load_spikformer_v1_checkpoint(v2, state)
    left = load_spikformer_v1_checkpoint(v2, state, strict=False)
    assert left and all(k.startswith(("patch_embed.extra2.", "patch_embed.extra3.")) for k in left)
    assert_loaded(v2, state)


def test_not_a_checkpoint():
    with pytest.raises(ValueError, match="neither a state_dict"):
        load_spikformer_v1_checkpoint(small_v1(), {"epoch": 1})
