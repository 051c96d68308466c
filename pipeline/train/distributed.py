"""Joining the process group every stage trains in, and seeding (the collectives themselves are in
pipeline.train.collectives).

Decisions
- DeepSpeed's CPU shared-memory comm op (`deepspeed_shm_comm`) is switched OFF on CPU: DeepSpeed
  would JIT-compile it with g++ on the first init of every fresh machine (measured here on 2 busy
  cores: build_engine took 109 s with the op, 3.3 s without), and fail where no compiler exists.
  gloo then carries all collectives; at CPU scale (few ranks, small models) that is cheap next to
  compute (not benchmarked against the shm op). The switch is the op-compatibility table that
  `deepspeed/comm/torch.py:build_shm_op` consults (`deepspeed.ops.__compatible_ops__`, probed
  lazily in 0.19); a test runs with CXX=/nonexistent and an empty TORCH_EXTENSIONS_DIR and checks
  nothing is built. PIPELINE_DS_SHM_COMM=1 keeps the op (e.g. after a DS_BUILD_SHM_COMM=1 install).
"""

from __future__ import annotations

import os
import random
import socket
from typing import TYPE_CHECKING

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.stages.context import StageContext


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disable_cpu_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory comm op (see module docstring)."""
    if os.environ.get("PIPELINE_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> tuple[int, int, int]:
    """Join (or create) the process group DeepSpeed will use; returns (rank, world_size, local_rank)."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        _disable_cpu_shm_comm()
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized() and "RANK" not in os.environ:
        # No launcher: a one-process group, so the same code runs in a notebook or a quick test. Its
        # rendezvous goes in arguments, not os.environ: variables written there would outlive the group
        # and reach every subprocess started later, which would then rendezvous at a stale MASTER_PORT.
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeedEngine asserts that it is set
        local_rank = int(os.environ["LOCAL_RANK"])
        if use_cuda:
            torch.cuda.set_device(local_rank)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=0, world_size=1,
                                   init_method=f"tcp://127.0.0.1:{_free_port()}")
        return dist.get_rank(), dist.get_world_size(), local_rank
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), local_rank



def setup_distributed(ctx: StageContext) -> tuple[int, int]:
    """Join the launcher's process group (or make a one-process one); check it agrees with ctx."""
    rank, world_size, _ = init_distributed()
    if (rank, world_size) != (ctx.rank, ctx.world_size):
        raise PipelineError(
            f"stage context says rank {ctx.rank} of {ctx.world_size}, but torch.distributed has rank "
            f"{rank} of {world_size}: the launcher built the context wrongly"
        )
    return rank, world_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

