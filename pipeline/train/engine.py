"""The DeepSpeed training engine every stage uses: build, step, checkpoint, resume, export.

    engine = build_engine(model, job.deepspeed, stage.optimizer, stage, loss_fn=..., steps_per_epoch=...)
    state = engine.resume(ckpt_dir)                  # None on a fresh start
    while not engine.finished:
        out = engine.train_step(micro_batches, skipped_samples=loader.skipped)   # one optimizer step
        if out.metrics: ctx.log_metrics(out.metrics, out.step)
        if engine.should_checkpoint(): engine.save_checkpoint(ckpt_dir, epoch=e, batch_in_epoch=b)
    engine.save_checkpoint(ckpt_dir, ...); engine.export(url, {"variant": ..., "kwargs": ...})

Decisions
- Distributed: an existing torch.distributed group (torchrun, Ray Train) is reused; otherwise one is
  made with `deepspeed.init_distributed` (a single-process group when no launcher env is set;
  pipeline.train.distributed).
  Backend: nccl on CUDA, gloo on CPU. Precision "auto" means bf16 on CUDA and fp32 on CPU (bf16 on
  CPUs without AMX/AVX512-BF16 is emulated and slow). In bf16 mode floating inputs are cast to bf16
  before the loss function sees them (DeepSpeed keeps the module's weights in bf16).
- Optimizer: torch AdamW as a client optimizer over timm param groups (pipeline.train.optim); DeepSpeed's
  fused/CPU Adam would compile C++ first. The timm cosine schedule is stepped by the engine once
  per optimizer step (never per micro-step) and its state travels in the checkpoint's client_state.
- One `train_step` call = one optimizer step over `grad_accum_steps` micro-batches. No step reads
  the device from the host outside log steps (tests/models/test_host_sync.py counts them): each step
  all-reduces its [non-finite flag, loss] on the device and keeps the result there; log steps, the
  last step and every checkpoint read all pending ones at once. A NaN/inf loss on any rank then
  raises PipelineError on all ranks naming the step it happened at; the steps after it (at most a
  log interval, with weights the bad step may have spoiled) are never saved: `save_checkpoint`
  reads the pending flags first and refuses, so the last good checkpoint stays `latest`. The loss
  curve is filled at those reads (`StepOutput.losses`, `read_losses`).
- DeepSpeed's own per-step host reads: ZeRO 1-2 checks bf16 gradients for overflow with a host read
  (`bf16.check_grad_overflow`, on by default), turned off here because the loss guard above covers
  it (a non-finite gradient gives a non-finite loss one step later, before any save); gradient
  clipping (`grad_clip`) reads the global norm on the host every step and cannot be turned off
  except by not clipping (deepspeed 0.19 `unscale_and_clip_grads`).
- Firing rates (`firing_rate_train/<layer>`, every loop.firing_rate_every_steps and at the last
  step): the mean spike count per element of every LIF layer's output during that step's own
  training forward (train-mode BatchNorm, the MIM-masked input), recorded by hooks
  (`models.energy.FiringRateProbe`) and read at the end of the step. Hooks added to a compiled
  module do not fire (torch.compile does not see them), so with `deepspeed.compile` that one step
  runs eagerly (`torch.compiler.set_stance("force_eager")`).
- `deepspeed.compile` compiles the module inside the engine (`DeepSpeedEngine.compile()`,
  torch.compile with Inductor, in place). Default "auto": on for CUDA runs (issue 20 measured the
  compiled 172M step at 1.3-1.9x the eager one on an H200), off on CPU; true/false force it.
- Where the time goes: `timer` (pipeline.train.timers.LoopTimer) times the step's sections (h2d,
  forward_backward, step_stats, optimizer, log, firing_rate; the trainer adds data_wait, hooks,
  checkpoint); log steps report them as `time/<section>` seconds per step.
- BatchNorm running statistics: DeepSpeed (unlike torch DDP) never syncs buffers, so every rank's
  running mean/var drift apart, and a checkpoint keeps only rank 0's. Before every checkpoint and
  export the engine averages them over ranks (timm's `distribute_bn(reduce=True)`), so all ranks
  hold the same buffers, a resumed run continues bit-exactly, and the export uses all ranks' data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import deepspeed
import torch

from pipeline.config import DeepSpeedSettings, LoopSettings, OptimizerSettings, deep_merge
from pipeline.errors import PipelineError
from pipeline.redact import redact_secrets
from pipeline.train import checkpoint as ckpt
from pipeline.train import checkpoint_io, collectives
from pipeline.train.checkpoint_verify import Selection
from pipeline.train.checkpoint_verify import select as select_checkpoint
from pipeline.train.distributed import init_distributed
from pipeline.train.export import write_export
from pipeline.train.metrics import IntervalMeter, peak_memory_mb
from pipeline.train.optim import build_optimizer, build_scheduler, resolve_lr, schedule_length
from pipeline.train.timers import LoopTimer

logger = logging.getLogger(__name__)

# (model, batch) -> loss, or (loss, {name: float or 0-d tensor}) for extra metrics averaged over the log
# interval (tensors stay on the device until the log step reads them).
LossFn = Callable[[Any, Any], "torch.Tensor | tuple[torch.Tensor, Mapping[str, Any]]"]
# module -> a probe: a context manager around the step's forward passes whose `rates()` then gives
# {layer name: firing rate} (models.energy.FiringRateProbe); every rank runs it.
FiringRateFn = Callable[[torch.nn.Module], Any]

_RESERVED_STATE = {"step", "epoch", "batch_in_epoch", "rng", "scheduler", "world_size", "global_batch"}


def use_bf16(ds: DeepSpeedSettings) -> bool:
    return ds.precision == "bf16" or (ds.precision == "auto" and torch.cuda.is_available())


def use_compile(ds: DeepSpeedSettings, cuda: bool | None = None) -> bool:
    """`deepspeed.compile`: true/false as given; "auto" compiles CUDA runs only (`cuda`: default, a GPU is there)."""
    if ds.compile == "auto":
        return torch.cuda.is_available() if cuda is None else cuda
    return ds.compile


def deepspeed_config(ds: DeepSpeedSettings, loop: LoopSettings, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for these settings (`config_overrides` merged last)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": loop.batch_size,
        "gradient_accumulation_steps": loop.grad_accum_steps,
        "train_batch_size": loop.batch_size * loop.grad_accum_steps * world_size,
        "gradient_clipping": ds.grad_clip or 0.0,
        "zero_optimization": {"stage": ds.zero_stage},
        # the loss guard covers overflow; DeepSpeed's check reads the device every step (module docstring)
        "bf16": {"enabled": use_bf16(ds), "check_grad_overflow": False},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, ds.config_overrides)


# --------------------------------------------------------------------------- batches


def _to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.to(float_dtype) if float_dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device, float_dtype) for v in batch)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def default_firing_rates() -> FiringRateFn | None:
    """`models.energy.FiringRateProbe` (training-forward rates), if the models package provides it."""
    try:
        from models.energy import FiringRateProbe
    except ImportError:
        return None
    return FiringRateProbe


# --------------------------------------------------------------------------- engine


@dataclass
class StepOutput:
    step: int  # optimizer steps completed (1 after the first call)
    metrics: dict[str, float] | None  # filled at log steps (every loop.log_every_steps), else None
    # (step, loss) of the steps whose statistics this step read (log steps: those since the last read)
    losses: list[tuple[int, float]] = field(default_factory=list)
    _stats: torch.Tensor | None = field(default=None, repr=False)  # [non-finite ranks, loss sum] on the device
    _divisor: int = 1

    @property
    def loss(self) -> float:
        """This step's loss, averaged over micro-batches and ranks. Reads the device (a host sync):
        for tests and tools; the loop takes `losses` at log steps instead."""
        return float(self._stats[1]) / self._divisor if self._stats is not None else float("nan")


class TrainEngine:
    """A DeepSpeed engine plus the schedule, metrics, NaN guard, checkpoints and export around it."""

    def __init__(
        self,
        ds_engine: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        loop: LoopSettings,
        loss_fn: LossFn,
        total_steps: int,
        rank: int,
        world_size: int,
        local_rank: int,
        firing_rate_fn: FiringRateFn | None,
    ) -> None:
        self.ds = ds_engine
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loop = loop
        self.loss_fn = loss_fn
        self.firing_rate_fn = firing_rate_fn
        self.total_steps = total_steps
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.global_batch = loop.batch_size * loop.grad_accum_steps * world_size
        self.device = torch.device(ds_engine.device)
        self.compute_dtype = torch.bfloat16 if ds_engine.bfloat16_enabled() else torch.float32
        self.zero_stage = ds_engine.zero_optimization_stage()
        self.step = 0
        self.last_checkpoint: str | None = None
        self._failed_step: int | None = None
        self._meter = IntervalMeter()
        self.timer = LoopTimer(self.device)
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, [non-finite ranks, loss sum]) not read yet
        self._read: list[tuple[int, float]] = []  # read, not yet handed out by read_losses()

    # ----------------------------------------------------------------- properties

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def current_lr(self) -> float:
        """The largest group lr right now (the un-decayed one under layer decay)."""
        return max(group["lr"] for group in self.optimizer.param_groups)

    def should_checkpoint(self) -> bool:
        return self.step > 0 and self.step % self.loop.checkpoint.every_steps == 0

    # ----------------------------------------------------------------- training

    def train_step(self, micro_batches: Sequence[Any], *, skipped_samples: int = 0) -> StepOutput:
        """Forward/backward over `grad_accum_steps` micro-batches, then one optimizer step.

        `skipped_samples` is this rank's running count of samples the loader dropped (bad images);
        the metrics report its sum over ranks. Outside log steps nothing here reads the device.
        """
        if self._failed_step is not None:
            raise PipelineError(f"training already stopped at step {self._failed_step} (non-finite loss)")
        if len(micro_batches) != self.loop.grad_accum_steps:
            raise PipelineError(
                f"train_step got {len(micro_batches)} micro-batches; loop.grad_accum_steps is "
                f"{self.loop.grad_accum_steps}"
            )
        started = time.perf_counter()
        timer = self.timer
        step_number = self.step + 1
        last = step_number >= self.total_steps
        log_step = step_number % self.loop.log_every_steps == 0 or last
        probe = None
        if self.firing_rate_fn is not None and (step_number % self.loop.firing_rate_every_steps == 0 or last):
            probe = self.firing_rate_fn(self.ds.module)
        float_dtype = self.compute_dtype if self.compute_dtype != torch.float32 else None
        losses, images, aux = [], 0, {}
        with self._probing(probe):
            for i, batch in enumerate(micro_batches):
                with timer.section("h2d", device=True):
                    batch = _to_device(batch, self.device, float_dtype)
                with timer.section("forward_backward" if probe is None else "forward_backward_probe", device=True):
                    result = self.loss_fn(self.ds, batch)
                    loss, aux = result if isinstance(result, tuple) else (result, aux)
                    self.ds.backward(loss)
                    if i < len(micro_batches) - 1:
                        self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step
                losses.append(loss.detach().float())
                first = _first_tensor(batch)
                images += first.shape[0] if first is not None else 0
        with timer.section("step_stats", device=True):
            loss_sum = torch.stack(losses).sum().to(torch.float64)
            stats = torch.stack([(~torch.isfinite(loss_sum)).to(torch.float64),
                                 torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0)])
            stats = collectives.all_reduce_sum(stats)  # on the device: no host read
        self._pending.append((step_number, stats))
        grad_norm = self._stage0_grad_norm() if self.zero_stage == 0 and log_step else None
        with timer.section("optimizer", device=True):
            self.ds.step()  # the boundary: clip, optimizer step
            self.step = step_number
            self.scheduler.step_update(self.step)
        metrics: dict[str, float] = {}
        if probe is not None:
            with timer.section("firing_rate"):
                metrics.update({f"firing_rate_train/{k}": float(v) for k, v in probe.rates().items()})
        timer.step_done()
        self._meter.add(images=images, compute_s=time.perf_counter() - started, aux=aux)
        read: list[tuple[int, float]] = []
        if log_step:
            with timer.section("log"):
                read = self.read_losses()  # raises on a non-finite step
                metrics.update(self._metrics(grad_norm, skipped_samples))
        return StepOutput(step=self.step, metrics=metrics or None, losses=read, _stats=stats,
                          _divisor=self.world_size * len(micro_batches))

    def _probing(self, probe: Any) -> Any:
        """The probe's hooks around the step's forward passes; a compiled module runs this step eagerly
        (hooks added after torch.compile never fire in the compiled graph)."""
        if probe is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if self.ds.is_compiled:
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(probe)
        return stack

    def _read_pending(self) -> None:
        """Read every pending step's statistics in one host read; raise at the first non-finite step."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        values = torch.stack([stats for _, stats in self._pending]).tolist()
        self._pending.clear()
        divisor = self.world_size * self.loop.grad_accum_steps
        for step, (bad_ranks, loss_total) in zip(steps, values, strict=True):
            if bad_ranks > 0:
                self._failed_step = step
                raise PipelineError(
                    f"non-finite loss (nan/inf) at step {step} on {int(bad_ranks)} of {self.world_size} rank(s) "
                    f"(found at step {self.step}); stopped without saving. Last good checkpoint: "
                    f"{self.last_checkpoint or 'none'}"
                )
            self._read.append((step, loss_total / divisor))
            self._meter.add_loss(loss_total / divisor)

    def read_losses(self) -> list[tuple[int, float]]:
        """(step, loss) of every step not handed out yet, oldest first (one host read of the pending
        statistics). Raises PipelineError when one of them was non-finite. Not collective."""
        self._read_pending()
        out, self._read = self._read, []
        return out

    def _stage0_grad_norm(self) -> float:
        # Without ZeRO, DeepSpeed does not keep the norm; grads are already averaged at this point.
        grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _metrics(self, grad_norm: float | None, skipped_samples: int) -> dict[str, float]:
        """The log step's metrics (collective: images and skipped samples are summed over ranks)."""
        counts = torch.tensor([float(self._meter.images), float(skipped_samples)], dtype=torch.float64)
        images_total, skipped_total = collectives.all_reduce_sum(counts).tolist()
        norm = self.ds.get_global_grad_norm() if grad_norm is None else grad_norm
        metrics = self._meter.summary(images_total)
        metrics.update(
            lr=self.current_lr(),
            grad_norm=float(norm) if norm is not None else float("nan"),
            peak_mem_mb=peak_memory_mb(self.device),
            skipped_samples=skipped_total,
            progress=self.step / self.total_steps,
        )
        metrics.update(self.timer.interval())
        self._meter.reset()
        return metrics

    # ----------------------------------------------------------------- checkpoints

    def sync_batchnorm_stats(self) -> None:
        """Average BN running mean/var over ranks (see module docstring). Collective."""
        collectives.average_batchnorm_stats(self.ds.module)

    def _is_checkpoint_writer(self) -> bool:
        return (self.local_rank if self.ds.use_node_local_storage() else self.rank) == 0

    def save_checkpoint(
        self,
        ckpt_dir: str | os.PathLike,
        *,
        epoch: int,
        batch_in_epoch: int,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Save tag `step<N>` and publish it as `latest`; returns the tag folder. Collective."""
        with contextlib.suppress(PipelineError):
            self._read_pending()  # a non-finite step not read yet sets _failed_step: refused below
        if self._failed_step is not None:
            raise PipelineError(f"refusing to save a checkpoint after the non-finite loss at step {self._failed_step}")
        clash = _RESERVED_STATE & set(extra or {})
        if clash:
            raise PipelineError(f"checkpoint extra state uses reserved keys {sorted(clash)}")
        self.sync_batchnorm_stats()
        client_state = {
            "step": self.step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "rng": ckpt.gather_rng_states(),
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            **(extra or {}),
        }
        tag = ckpt.save(
            self.ds,
            ckpt_dir,
            self.step,
            client_state,
            keep_last=self.loop.checkpoint.keep_last,
            is_writer=self._is_checkpoint_writer(),
        )
        self.last_checkpoint = os.path.join(str(ckpt_dir), tag)
        return self.last_checkpoint

    def resume(self, ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict[str, Any] | None:
        """Restore model, optimizer, schedule, step and RNG from `ckpt_dir`: its newest tag that verifies
        (pipeline.train.checkpoint_verify), or `tag`.

        Returns the client_state (step, epoch, batch_in_epoch and the stage's extra keys), or None
        when there is nothing to resume from. Collective.
        """
        selection = select_checkpoint([str(ckpt_dir)], tag=tag)
        return None if selection is None else self.resume_from(selection)

    def resume_from(self, selection: Selection) -> dict[str, Any]:
        """Restore the tag `selection` names (verified by checkpoint_verify.select). Collective."""
        state = ckpt.load_selected(self.ds, selection)
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.step_update(self.step)
        rng = state.get("rng") or []
        if len(rng) == self.world_size:
            ckpt.restore_rng(rng[self.rank])
        else:
            logger.warning(
                "checkpoint has RNG states for %d ranks, this run has %d: RNG not restored",
                len(rng),
                self.world_size,
            )
        if state.get("global_batch") not in (None, self.global_batch):
            logger.warning(
                "global batch changed from %s to %d since the checkpoint",
                state["global_batch"],
                self.global_batch,
            )
        self.last_checkpoint = selection.path
        self._meter.reset()
        logger.info(
            "resumed at step %d (epoch %s, batch %s)",
            self.step,
            state.get("epoch"),
            state.get("batch_in_epoch"),
        )
        return state

    # ----------------------------------------------------------------- export

    def state_dict_fp32(self, prefix: str | None = None) -> dict[str, torch.Tensor]:
        """The full fp32 state_dict (parameters from the fp32 master copies, buffers as floats in fp32),
        on CPU, on every rank. With `prefix`, only keys under it, with the prefix removed. Collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        self.sync_batchnorm_stats()
        module = self.ds.module
        names = list(module.state_dict().keys())  # ZeRO-3 gives empty param tensors, but the right names
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        masters = self._stage0_bf16_masters()
        out: dict[str, torch.Tensor] = {}
        for name in names:
            if name in params:
                p = params[name]
                full = safe_get_full_fp32_param(p)  # collective under ZeRO 1-3
                if full is None:
                    if hasattr(p, "ds_id"):  # ZeRO-3 parameter the optimizer does not own (frozen)
                        with deepspeed.zero.GatheredParameters([p]):
                            full = p.detach().clone()
                    else:
                        full = masters.get(id(p), p).detach()
                tensor = full.reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
            else:
                tensor = buffers[name].detach()
            tensor = tensor.to("cpu")
            out[name] = (tensor.float() if tensor.is_floating_point() else tensor).clone()
        if prefix:
            head = prefix.rstrip(".") + "."
            out = {k[len(head) :]: v for k, v in out.items() if k.startswith(head)}
            if not out:
                raise PipelineError(f"export: no state_dict keys under prefix {prefix!r}")
        return out

    def _stage0_bf16_masters(self) -> dict[int, torch.Tensor]:
        """ZeRO-0 + bf16: DeepSpeed's unfused mixed-precision optimizer keeps the fp32 master copies in
        `fp32_groups`, parallel to the module parameters in `fp16_groups`, without the `_hp_mapping`
        that `safe_get_full_fp32_param` reads. Map parameter id -> master (empty in every other mode)."""
        low, high = (getattr(self.ds.optimizer, name, None) for name in ("fp16_groups", "fp32_groups"))
        if not (self.zero_stage == 0 and low and high):
            return {}
        return {id(p): m for lo, hi in zip(low, high, strict=True) for p, m in zip(lo, hi, strict=True)}

    def export(self, url: str, config: Mapping[str, Any], *, state: dict[str, torch.Tensor] | None = None,
               prefix: str | None = None) -> str:
        """Write the consolidated fp32 export (pipeline.train.export format; `config` needs variant and kwargs)
        from rank 0, of `state` or else of the engine's own weights; returns its sha256 on every rank.
        Collective."""
        state_dict = self.state_dict_fp32(prefix) if state is None else state
        digest = write_export(state_dict, {"step": self.step, **config}, url) if self.rank == 0 else None
        return collectives.broadcast_from_rank0(digest)

    def gathered_parameters(self):
        """A context in which every parameter of the module is whole on every rank (ZeRO-3 gathers
        them, collectively); a no-op below ZeRO-3."""
        if self.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.ds.module.parameters()))
        return contextlib.nullcontext()


def build_engine(
    model: torch.nn.Module,
    ds: DeepSpeedSettings,
    optim: OptimizerSettings,
    loop: LoopSettings,
    *,
    loss_fn: LossFn,
    steps_per_epoch: int,
    firing_rate_fn: FiringRateFn | None | str = "default",
) -> TrainEngine:
    """Wrap `model` in DeepSpeed with an AdamW + cosine schedule built from the job settings.

    steps_per_epoch: optimizer steps per epoch (batches per rank per epoch // grad_accum_steps); sets
        the schedule length (loop.max_steps if set, else loop.epochs worth) and warmup (optim.warmup_epochs).
    firing_rate_fn: per-layer firing rates every loop.firing_rate_every_steps; "default" uses
        models.energy.firing_rates when the models package has it, None turns them off.
    World size, rank and backend come from the process group (see init_distributed).
    """
    if steps_per_epoch < 1:
        raise PipelineError(f"steps_per_epoch must be >= 1 (got {steps_per_epoch}): is the training set empty?")
    rank, world_size, local_rank = init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO dumps the whole config per rank
    config = deepspeed_config(ds, loop, world_size)
    lr = resolve_lr(optim, config["train_batch_size"])
    length = schedule_length(optim, epochs=loop.epochs, steps_per_epoch=steps_per_epoch, max_steps=loop.max_steps)
    if config["bf16"]["enabled"]:
        # DeepSpeed casts the module to bf16 itself under ZeRO 0-2, but under ZeRO-3 only the parameters,
        # leaving BN buffers fp32 (BatchNorm then fails on bf16 inputs). Cast everything up front, in
        # place, so the optimizer's param groups still hold the same Parameter objects.
        model.to(torch.bfloat16)
    optimizer = build_optimizer(model, optim, lr)
    ds_engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # DeepSpeed stores this dict in every checkpoint (`ds_config`); it has read what it needs from it
    # (monitors included), so a secret in config_overrides (e.g. comet.api_key) is masked there
    ds_engine.config = redact_secrets(ds_engine.config)
    if use_compile(ds):
        # DeepSpeed's own hook: torch.compile of the wrapped module in place (nn.Module.compile), so
        # parameter names, the optimizer's groups and checkpoints are those of the eager module.
        ds_engine.compile()
    # The ZeRO wrappers keep the client optimizer's param_group dicts, so the schedule can drive them.
    scheduler = build_scheduler(ds_optimizer, optim, length)
    checkpoint_io.install(ds_engine)  # checkpoints hashed as written, read weights-only (refuses other writers)
    if firing_rate_fn == "default":
        firing_rate_fn = default_firing_rates()
    logger.info(
        "engine: ZeRO-%d, %s, world %d, global batch %d (micro %d x accum %d), lr %.3g, %d steps (warmup %d)",
        ds.zero_stage,
        "bf16" if config["bf16"]["enabled"] else "fp32",
        world_size,
        config["train_batch_size"],
        loop.batch_size,
        loop.grad_accum_steps,
        lr,
        length.total_steps,
        length.warmup_steps,
    )
    return TrainEngine(
        ds_engine,
        ds_optimizer,
        scheduler,
        loop=loop,
        loss_fn=loss_fn,
        total_steps=length.total_steps,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        firing_rate_fn=firing_rate_fn,
    )
