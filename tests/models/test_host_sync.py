"""No host synchronisation in a training step: pretraining (MIM, visible-token path) and finetuning,
the model's step and the engine's (pipeline.train.engine.TrainEngine.train_step).

On CUDA (``benchmarks/gpu_check.sh`` runs this file on a GPU): a full step (forward, backward, AdamW
step) of the tiny model runs under ``torch.cuda.set_sync_debug_mode("error")``, in float32 and in
bfloat16 (how DeepSpeed trains on GPUs), so any op that waits for the device raises.

Everywhere (CPU): the ops a step dispatches are recorded and none of those that need a
device-to-host read on CUDA may appear (``nonzero``, ``.item()``, ``masked_select``, boolean-mask
indexing: each has an output shape or value that depends on the data). The control shows the check
catches the dense reference path's boolean-indexing BatchNorms.

The engine (DeepSpeed ZeRO-2, bf16 as on GPUs, one-process gloo group): every host read of tensor
data (`.item()`, `float()`/`bool()` = `_local_scalar_dense`, `.tolist()`, `.numpy()`, `.cpu()`) is
counted per optimizer step with the code that made it; none may happen outside log steps. Reads
inside torch.optim are not counted: AdamW keeps its step counters on the CPU (non-capturable,
non-fused), so they never wait for a GPU. Controls: a loss function that reads its metric with
float() every step is caught, and so is DeepSpeed's gradient clipping (a host read of the global
norm every step, which no DeepSpeed setting turns off while clipping; see pipeline/train/engine.py).
On CUDA the engine's non-log steps also run under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

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


# --------------------------------------------------------------------------------------------------
# The engine: host reads per optimizer step, outside log steps
# --------------------------------------------------------------------------------------------------

TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
OPTIM_DIR = os.path.join(TORCH_DIR, "optim") + os.sep
LOG_EVERY, PROBE_EVERY, STEPS = 4, 8, 12


class HostReads(TorchDispatchMode):
    """Counts reads of tensor data by the host, keyed by the first caller outside torch (file:line)."""

    READERS = ("tolist", "numpy", "cpu")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._saved = {}

    def _caller(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(OPTIM_DIR):
                return None  # torch.optim's CPU step counters: no device wait (module docstring)
            instrument = name == __file__ and frame.f_code.co_name in ("_record", "reader", "__torch_dispatch__")
            if not name.startswith(TORCH_DIR) and not instrument:
                return f"{os.path.relpath(name, os.path.dirname(TORCH_DIR.rstrip(os.sep)))}:{frame.f_lineno}"
            frame = frame.f_back
        return "?"

    def _record(self) -> None:
        caller = self._caller()
        if caller is not None:
            self.found.append(caller)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self._record()
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in self.READERS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def reader(tensor, *args, _original=original, **kwargs):
                self._record()
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, reader)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def _engine(loss_fn, grad_clip=None, device="cpu"):
    from models.mim import MaskedImageModel
    from pipeline.config import DeepSpeedSettings, LoopSettings, OptimizerSettings
    from pipeline.train.engine import build_engine

    torch.manual_seed(0)
    encoder = models.create("spikformer_v2_tiny", num_classes=0)
    model = MaskedImageModel(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    loop = LoopSettings(batch_size=BATCH, max_steps=STEPS, log_every_steps=LOG_EVERY,
                        firing_rate_every_steps=PROBE_EVERY)
    ds = DeepSpeedSettings(zero_stage=2, precision="bf16", grad_clip=grad_clip)
    return build_engine(model.to(device), ds, OptimizerSettings(warmup_epochs=0, lr=1e-3), loop, loss_fn=loss_fn,
                        steps_per_epoch=STEPS)


def _batch(device="cpu"):
    images = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(BATCH, dtype=torch.long)
    if device == "cuda":
        return images.pin_memory(), labels.pin_memory()  # as the loader hands them over on CUDA
    return images, labels


def _reads_per_step(engine, batch) -> dict[int, list[str]]:
    reads: dict[int, list[str]] = defaultdict(list)
    while not engine.finished:
        with HostReads() as counter:
            out = engine.train_step([batch])
        reads[out.step] = counter.found
    return reads


def _mim_loss(module, batch):
    from pipeline.stages.pretrain import mim_loss

    return mim_loss(module, batch)


def _mim_loss_with_a_float_metric(module, batch):
    images, _ = batch
    loss, _pred, mask = module(images)
    return loss, {"masked": float(mask.float().mean())}  # the per-step read the engine must not do


def _log_step(step: int) -> bool:
    return step % LOG_EVERY == 0 or step == STEPS


@pytest.mark.usefixtures("one_thread")
def test_engine_reads_the_device_only_at_log_steps():
    reads = _reads_per_step(_engine(_mim_loss), _batch())
    assert sorted(reads) == list(range(1, STEPS + 1))
    for step, found in reads.items():
        if _log_step(step):
            assert found, f"step {step}: a log step reads its statistics; the counter saw nothing"
        else:
            assert found == [], f"step {step} read the device from the host at {found}"


@pytest.mark.usefixtures("one_thread")
def test_control_a_per_step_read_is_caught():
    reads = _reads_per_step(_engine(_mim_loss_with_a_float_metric), _batch())
    culprits = {s: found for s, found in reads.items() if not _log_step(s) and found}
    assert sorted(culprits) == [s for s in range(1, STEPS + 1) if not _log_step(s)]
    assert all(any("test_host_sync.py" in where for where in found) for found in culprits.values())


@pytest.mark.usefixtures("one_thread")
def test_deepspeed_gradient_clipping_reads_the_norm_every_step():
    reads = _reads_per_step(_engine(_mim_loss, grad_clip=3.0), _batch())
    for step, found in reads.items():
        if not _log_step(step):
            assert found and all(where.startswith("deepspeed") for where in found), (step, found)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_steps_have_no_host_sync_on_cuda():
    engine = _engine(_mim_loss, device="cuda")
    batch = _batch("cuda")
    engine.train_step([batch])  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    while not engine.finished:
        checked = not _log_step(engine.step + 1)
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            engine.train_step([batch])
        finally:
            torch.cuda.set_sync_debug_mode("default")
