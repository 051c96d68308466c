"""Every collective the pipeline runs goes through here, so each one meets its process group on the
device that group's backend serves.

Why one module: NCCL refuses CPU tensors ("No backend type associated with device type cpu") and gloo
is the CPU backend, so a collective written against one backend breaks on the other. The first H200
run showed it: evaluate all-reduced its confusion matrix as a CPU tensor and every GPU evaluation died.
Here a tensor is moved to the group's device for the collective and handed back on the device it came
from; object collectives serialise through that device too. tests/layering/test_collectives_contract.py
fails when a module outside this one calls a torch.distributed collective (or timm's distribute_bn)
directly.

Without a process group (one process, a notebook, a unit test) every function is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_for_backend(backend: str, cuda_index: int | None) -> torch.device:
    """The device a collective of `backend` takes tensors on. A backend string may name one backend
    ("nccl", "gloo") or one per device type ("cpu:gloo,cuda:nccl"); any NCCL part means CUDA."""
    if "nccl" in backend.lower():
        if cuda_index is None:
            raise RuntimeError(f"process group backend {backend!r} needs a CUDA device, but none is set")
        return torch.device("cuda", cuda_index)
    return torch.device("cpu")


def group_device() -> torch.device:
    """The device of the default process group's collectives (CPU without a group)."""
    if not is_distributed():
        return torch.device("cpu")
    cuda_index = torch.cuda.current_device() if torch.cuda.is_available() else None
    return device_for_backend(str(dist.get_backend()), cuda_index)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks, returned on `tensor`'s device (a new tensor; `tensor` unchanged
    unless it already lives on the group's device)."""
    if not is_distributed():
        return tensor
    work = tensor.to(group_device())
    dist.all_reduce(work)
    return work.to(tensor.device)


def all_gather_equal(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape and dtype on all ranks), in rank order, on `tensor`'s device."""
    if not is_distributed():
        return [tensor]
    work = tensor.contiguous().to(group_device())
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, work)
    return [part.to(tensor.device) for part in parts]


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's picklable `value` on every rank (rank 0 decides, the others follow)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=group_device())
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)  # torch serialises through the current CUDA device under NCCL
    return values


def average_batchnorm_stats(module: torch.nn.Module) -> None:
    """BatchNorm running mean/var averaged over ranks in place (timm's distribute_bn; the buffers live on
    the training device, which is the group's device in every launch the pipeline makes)."""
    _, world_size = world()
    if world_size > 1:
        from timm.utils import distribute_bn

        distribute_bn(module, world_size, reduce=True)
