"""A checkpoint save that meets a full storage, then the same save once space is back.

Run as a plain process (a one-process gloo group) or under `torchrun --nproc_per_node 2`. Every rank
writes OUT/rank<r>.json with what it saw. Storage modes (on rank --limit-rank only, or all ranks):
  fsize: RLIMIT_FSIZE just above the files already written, SIGXFSZ ignored -> writes fail with EFBIG
  fill:  the checkpoint folder is a small tmpfs (mounted by the test); a filler file leaves 8 KB free
         -> writes fail with ENOSPC
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy import ToyNet, epoch_batches  # noqa: E402

from pipeline.config import CheckpointSettings, DeepSpeedSettings, LoopSettings, OptimizerSettings  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.train import checkpoint as ckpt  # noqa: E402
from pipeline.train import collectives  # noqa: E402
from pipeline.train.engine import build_engine  # noqa: E402


def _loss(model, batch):
    images, labels, _ = batch
    return F.cross_entropy(model(images), labels)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--mode", choices=["fsize", "fill"], required=True)
    p.add_argument("--limit-rank", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    loop = LoopSettings(batch_size=4, max_steps=8, checkpoint=CheckpointSettings(every_steps=1, keep_last=3))
    engine = build_engine(ToyNet(), DeepSpeedSettings(zero_stage=2), OptimizerSettings(lr=1e-2, warmup_epochs=0),
                          loop, loss_fn=_loss, steps_per_epoch=4, firing_rate_fn=None)
    rank, world = collectives.world()
    batches = epoch_batches(0, rank, world, size=32, micro=4)
    engine.train_step([batches[0]])
    engine.save_checkpoint(args.ckpt, epoch=0, batch_in_epoch=1)
    engine.train_step([batches[1]])

    limited = rank == args.limit_rank
    filler = Path(args.ckpt) / "filler"
    if limited and args.mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    if limited and args.mode == "fill":
        free = shutil.disk_usage(args.ckpt).free
        with open(filler, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(free - 8192, 0))
    collectives.barrier()
    result: dict = {"rank": rank, "world": world}
    try:
        engine.save_checkpoint(args.ckpt, epoch=0, batch_in_epoch=2)
        result["error"] = None
    except PipelineError as err:
        result["error"] = str(err)
        result["error_type"] = type(err).__name__
        result["retryable"] = err.retryable
    result["tags_after_failure"] = sorted(p.name for p in Path(args.ckpt).iterdir() if p.is_dir())
    result["latest_after_failure"] = ckpt.read_latest(args.ckpt)

    # space back: the same save goes through
    if limited and args.mode == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    if limited and args.mode == "fill":
        filler.unlink()
    collectives.barrier()
    engine.save_checkpoint(args.ckpt, epoch=0, batch_in_epoch=2)
    result["latest_after_retry"] = ckpt.read_latest(args.ckpt)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    collectives.barrier()


if __name__ == "__main__":
    main()
    os._exit(0)  # skip slow interpreter teardown of DeepSpeed/gloo threads
