"""Run under `torchrun --nproc_per_node 2`: every engine check for one ZeRO stage in one launch.

Phases (each rank writes what it saw to OUT/rank<r>.json; test_distributed.py asserts on it):
  U  uninterrupted: N steps, checkpoint every K (keep_last 3) and at the end, export.
  R  a fresh engine (other init seed) resumes U's tag at step S, runs to N, exports: must match U.
     Then R takes step N+1 and writes its tag without publishing it (a crash between the two),
     and step N+2 with a NaN loss on rank 1: must raise on both ranks and not save.
  E  a fresh engine resumes R's folder: must land on step N (not N+1) and redo step N+1 exactly.
  B  bf16 on CPU for a few steps: the export holds the fp32 master weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import deepspeed
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy import VARIANT, VARIANT_KWARGS, create_spikformer, epoch_batches  # noqa: E402

from pipeline.config import CheckpointSettings, DeepSpeedSettings, LoopSettings, OptimizerSettings  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.train import checkpoint as ckpt  # noqa: E402
from pipeline.train.distributed import init_distributed  # noqa: E402
from pipeline.train.engine import build_engine  # noqa: E402
from pipeline.train.export import read_export  # noqa: E402

DATASET = 64
MICRO, ACCUM = 4, 2
LR = 1e-2
STEPS, EVERY, RESUME_AT = 24, 5, 15  # tags 5..24, keep_last 3 -> 15, 20, 24 survive


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--zero", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layer-decay", type=float, default=None)
    return p.parse_args()


class Run:
    """Drives one engine over the toy data, recording losses, batch ids and metrics per step."""

    def __init__(
        self, args: argparse.Namespace, model_seed: int, *, nan_at: int | None = None, precision: str = "auto"
    ) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.nan_at = nan_at
        torch.manual_seed(model_seed)
        model = create_spikformer()
        loop = LoopSettings(
            max_steps=STEPS,
            batch_size=MICRO,
            grad_accum_steps=ACCUM,
            log_every_steps=4,
            firing_rate_every_steps=8,
            checkpoint=CheckpointSettings(every_steps=EVERY, keep_last=3),
        )
        optim = OptimizerSettings(lr=LR, warmup_epochs=1, min_lr=1e-4, warmup_lr=1e-4, layer_decay=args.layer_decay)
        started = time.perf_counter()
        self.engine = build_engine(
            model,
            DeepSpeedSettings(zero_stage=args.zero, grad_clip=5.0, precision=precision),
            optim,
            loop,
            loss_fn=self.loss,
            steps_per_epoch=DATASET // (MICRO * ACCUM * self.world),
            firing_rate_fn="default",
        )
        self.init_s = time.perf_counter() - started
        torch.manual_seed(100 + self.rank)  # per-rank dropout streams: RNG restore must be per rank
        self.epoch, self.batch = 0, 0
        self.losses: dict[int, float] = {}
        self.first_ids: dict[int, list[int]] = {}
        self.metrics: dict[int, dict] = {}
        self.lrs: dict[int, float] = {}

    def loss(self, model, batch):
        images, labels, _ = batch
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        if self.nan_at is not None and self.engine.step + 1 == self.nan_at and self.rank == 1:
            loss = loss * float("nan")
        return loss, {"acc": (logits.argmax(1) == labels).float().mean().item()}

    def resume(self, ckpt_dir: str, tag: str | None = None) -> dict | None:
        state = self.engine.resume(ckpt_dir, tag)
        if state is not None:
            self.epoch, self.batch = state["epoch"], state["batch_in_epoch"]
        return state

    def train(self, until: int, ckpt_dir: str | None) -> None:
        eng = self.engine
        while eng.step < until:
            batches = epoch_batches(self.epoch, self.rank, self.world, size=DATASET, micro=MICRO)
            while self.batch + ACCUM <= len(batches) and eng.step < until:
                micro = batches[self.batch : self.batch + ACCUM]
                self.batch += ACCUM
                out = eng.train_step(micro, skipped_samples=self.rank + 1)
                self.losses[out.step] = out.loss
                self.lrs[out.step] = eng.current_lr()
                self.first_ids[out.step] = micro[0][2].tolist()
                if out.metrics:
                    self.metrics[out.step] = out.metrics
                if ckpt_dir and eng.should_checkpoint():
                    eng.save_checkpoint(ckpt_dir, epoch=self.epoch, batch_in_epoch=self.batch, extra={"note": "toy"})
            if self.batch + ACCUM > len(batches):
                self.epoch, self.batch = self.epoch + 1, 0

    def params(self) -> dict[str, torch.Tensor]:
        return self.engine.state_dict_fp32()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    init_distributed()
    out = Path(args.out)
    rank_dir = lambda name: str(out / name)  # noqa: E731
    res: dict = {}

    # ---- U: uninterrupted
    u = Run(args, model_seed=0)
    res["init_s"] = u.init_s
    res["shm_comm_op"] = repr(deepspeed.comm.comm.cdb.shm_comm_op)
    res["group_lrs"] = [(g["lr"], g.get("lr_scale", 1.0)) for g in u.engine.optimizer.param_groups]
    u.train(STEPS, rank_dir("ckpt_u"))
    if u.engine.last_checkpoint is None or not u.engine.last_checkpoint.endswith(ckpt.tag_for_step(STEPS)):
        u.engine.save_checkpoint(rank_dir("ckpt_u"), epoch=u.epoch, batch_in_epoch=u.batch)
    digest = u.engine.export(rank_dir("export_u"), {"variant": VARIANT, "kwargs": VARIANT_KWARGS, "stage": "test"})
    u_params = u.params()
    res.update(
        u_lrs=u.lrs,
        u_losses=u.losses,
        u_ids=u.first_ids,
        u_metrics=u.metrics,
        digest=digest,
        u_tags=sorted(p.name for p in (out / "ckpt_u").iterdir() if p.is_dir()),
        u_latest=ckpt.read_latest(out / "ckpt_u"),
    )
    dist.barrier()
    if dist.get_rank() == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd, config = read_export(rank_dir("export_u"))
        fresh = timm.create_model(config["variant"], **config["kwargs"])
        missing, unexpected = fresh.load_state_dict(sd, strict=True)
        res["export_config"] = config
        res["export_equals_engine"] = same(sd, fresh.state_dict()) and same(sd, u_params)
        if args.zero > 0:  # DeepSpeed's consolidation tool only reads ZeRO checkpoints
            zero_sd = get_fp32_state_dict_from_zero_checkpoint(rank_dir("ckpt_u"))
            res["export_equals_zero_to_fp32"] = same(
                {k: v.float() if v.is_floating_point() else v for k, v in zero_sd.items()}, sd
            )
        res["export_dtypes"] = sorted({str(v.dtype) for v in sd.values()})

    # ---- R: resume U's step-RESUME_AT tag into a differently initialised engine
    r = Run(args, model_seed=1)
    state = r.resume(rank_dir("ckpt_u"), ckpt.tag_for_step(RESUME_AT))
    res["r_state"] = {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "note")}
    res["r_lr_after_resume"] = r.engine.current_lr()
    res["u_lr_at_resume"] = u.lrs[RESUME_AT]
    r.train(STEPS, rank_dir("ckpt_r"))
    r.engine.save_checkpoint(rank_dir("ckpt_r"), epoch=r.epoch, batch_in_epoch=r.batch)
    r.engine.export(rank_dir("export_r"), {"variant": VARIANT, "kwargs": VARIANT_KWARGS})
    res.update(r_losses=dict(r.losses), r_ids=dict(r.first_ids), r_params_equal_u=same(r.params(), u_params))

    # ---- crash simulation: R steps once more and writes tag STEPS+1 but never publishes it
    r.train(STEPS + 1, None)
    ckpt.write_tag(r.engine.ds, rank_dir("ckpt_r"), r.engine.step, {"step": r.engine.step})
    dist.barrier()
    res["crash_tags"] = sorted(p.name for p in (out / "ckpt_r").iterdir() if p.is_dir())

    # ---- NaN on rank 1 at step STEPS + 2: raises on both ranks, nothing saved
    r.nan_at = STEPS + 2
    latest_before = ckpt.read_latest(out / "ckpt_r")
    try:
        r.train(STEPS + 2, rank_dir("ckpt_r"))
        res["nan_error"] = None
    except PipelineError as err:
        res["nan_error"] = str(err)
    try:
        r.engine.save_checkpoint(rank_dir("ckpt_r"), epoch=r.epoch, batch_in_epoch=r.batch)
        res["save_after_nan"] = "saved"
    except PipelineError as err:
        res["save_after_nan"] = str(err)
    dist.barrier()
    res["nan_latest"] = [latest_before, ckpt.read_latest(out / "ckpt_r")]
    res["nan_tags"] = sorted(p.name for p in (out / "ckpt_r").iterdir() if p.is_dir())

    # ---- E: a fresh engine resumes R's folder: `latest` still names STEPS, not the unpublished tag
    e = Run(args, model_seed=3)
    state = e.resume(rank_dir("ckpt_r"))
    res["crash_resumed_step"] = state["step"]
    res["crash_params_equal_u"] = same(e.params(), u_params)
    e.train(STEPS + 1, None)
    e.engine.save_checkpoint(rank_dir("ckpt_r"), epoch=e.epoch, batch_in_epoch=e.batch)
    res["after_crash_tags"] = sorted(p.name for p in (out / "ckpt_r").iterdir() if p.is_dir())
    res["after_crash_latest"] = ckpt.read_latest(out / "ckpt_r")
    res["c_loss"], res["e_loss"] = r.losses[STEPS + 1], e.losses[STEPS + 1]

    # ---- B: bf16 (the GPU default) on CPU: inputs cast for the bf16 module, export from fp32 masters
    b = Run(args, model_seed=4, precision="bf16")
    b.train(3, None)
    sd = b.engine.state_dict_fp32()
    params = list(b.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=args.zero == 3):
        module_bf16 = {n: p.detach().clone() for n, p in params}
    res["bf16_losses"] = list(b.losses.values())
    res["bf16_module_dtypes"] = sorted({str(v.dtype) for v in module_bf16.values()})
    res["bf16_export_dtypes"] = sorted({str(v.dtype) for v in sd.values()})
    res["bf16_export_rounds_to_module"] = all(torch.equal(sd[n].to(torch.bfloat16), v) for n, v in module_bf16.items())
    res["bf16_export_is_not_just_bf16"] = any(not torch.equal(sd[n], v.float()) for n, v in module_bf16.items())

    with open(out / f"rank{dist.get_rank()}.json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    dist.barrier()


if __name__ == "__main__":
    main()
    os._exit(0)  # skip slow interpreter teardown of DeepSpeed/gloo threads
