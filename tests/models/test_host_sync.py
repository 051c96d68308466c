"""No host synchronisation in a training step: pretraining (MIM, visible-token path) and finetuning.

On CUDA (``benchmarks/gpu_check.sh`` runs this file on a GPU): a full step (forward, backward, AdamW
step) of the tiny model runs under ``torch.cuda.set_sync_debug_mode("error")``, in float32 and in
bfloat16 (how DeepSpeed trains on GPUs), so any op that waits for the device raises.

Everywhere (CPU): the ops a step dispatches are recorded and none of those that need a
device-to-host read on CUDA may appear (``nonzero``, ``.item()``, ``masked_select``, boolean-mask
indexing: each has an output shape or value that depends on the data). The control shows the check
catches the dense reference path's boolean-indexing BatchNorms.
"""

from __future__ import annotations

import pytest
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.utils._python_dispatch import TorchDispatchMode

import models
from models.mim import MaskedImageModel

BATCH = 8


def build(kind: str, encoder_path: str = "visible") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "finetune":
        return models.create("spikformer_v2_tiny", drop_path_rate=0.1)
    encoder = models.create("spikformer_v2_tiny", num_classes=0)
    return MaskedImageModel(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, encoder_path=encoder_path)


def step_fn(kind: str, model: torch.nn.Module, device: str, dtype: torch.dtype):
    """One training step's loss: the MIM loss with a fresh random mask, or mixup/cutmix + soft-target
    cross-entropy as the finetune stage does."""
    images = torch.randn(BATCH, 3, 32, 32, device=device, dtype=dtype)
    labels = torch.randint(0, 10, (BATCH,), device=device)
    if kind == "pretrain":
        return lambda: model(images)[0]
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    criterion = SoftTargetCrossEntropy()

    def loss():
        x, target = mixup(images.clone(), labels)
        return criterion(model(x).float(), target)

    return loss


# --------------------------------------------------------------------------------------------------
# CUDA: the real check
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_training_step_has_no_host_sync_on_cuda(kind, dtype):
    model = build(kind).to("cuda", dtype).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = step_fn(kind, model, "cuda", dtype)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.detach()

    train_step()  # warm-up: Triton LIF kernel builds, cuBLAS handles, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [train_step() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss).item() for loss in losses)  # read only after the checked steps


# --------------------------------------------------------------------------------------------------
# CPU: the ops that would sync on CUDA never run
# --------------------------------------------------------------------------------------------------

SYNCING_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "masked_scatter", "unique_consecutive",
               "_unique2", "argwhere", "nonzero_static"}


class SyncingOps(TorchDispatchMode):
    """Records every dispatched op that needs a host read on CUDA (by name, or a bool-mask index)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.found.append(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.found.append(f"{name} with a bool mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_training_step_dispatches_no_syncing_op(kind):
    model = build(kind).train()
    loss_fn = step_fn(kind, model, "cpu", torch.float32)
    with SyncingOps() as ops:
        loss = loss_fn()
        loss.backward()
    assert ops.ops > 200  # the mode did see the step
    assert ops.found == []
    assert torch.isfinite(loss)


def test_control_the_dense_reference_path_is_caught():
    model = build("pretrain", encoder_path="dense").train()
    with SyncingOps() as ops:
        model(torch.randn(BATCH, 3, 32, 32))[0].backward()
    assert "index with a bool mask" in ops.found
