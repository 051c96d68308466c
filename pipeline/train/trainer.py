"""The training loop every training stage runs: loader + engine (pipeline.train.engine) + checkpoints
+ reports + the loss curve.

The loop (`StageTrainer`), read top to bottom:
    trainer = StageTrainer(job, settings, ctx, stage=..., model=..., loss_fn=..., manifest_url=..., role=...)
    trainer.resume()        # ctx.resume_dir, else the latest checkpoint in ctx.work_dir/checkpoints
    trainer.fit()           # optimizer steps until the schedule ends; checkpoints + ctx.report every N steps
    trainer.save_final()    # last checkpoint (collective)
    ...export...
    trainer.report_final(metrics)
Data position: a checkpoint stores (epoch, batch_in_epoch) = loader batches consumed in that epoch;
a resumed run rebuilds the same epoch from (seed, epoch) and skips exactly those batches
(`pipeline.data.stream`), so the next batch is the one an uninterrupted run would have taken.

Checkpoint folders: every rank writes its DeepSpeed files into `ctx.work_dir/checkpoints` (ranks of
one node may share it, as under torchrun). At each checkpoint step every rank hands the launcher a
folder holding only the new tag (hard links) and a `latest` pointer: Ray Train merges the ranks'
folders into one, which a restarted stage gets back as `ctx.resume_dir`. Resuming from
`ctx.work_dir` without a resume_dir needs all ranks to see the same folder (one node).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import JobConfig, LoopSettings
from pipeline.data.fsutil import join_url
from pipeline.errors import PipelineError
from pipeline.train import checkpoint as ckpt
from pipeline.train.artifacts import publish, write_loss_curve
from pipeline.train.checkpoint_verify import Selection
from pipeline.train.checkpoint_verify import select as select_checkpoint
from pipeline.train.collectives import broadcast_from_rank0
from pipeline.train.distributed import seed_everything, setup_distributed
from pipeline.train.engine import LossFn, StepOutput, TrainEngine, build_engine

if TYPE_CHECKING:
    from pipeline.stages.context import StageContext

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
FALLBACK_TAG = "pipeline.checkpoint_fallback"  # set on the stage run when newer checkpoints were refused
MAX_TAG_CHARS = 5000  # MLflow's limit for a tag value (8000 in recent servers; 5000 in older ones)
EXPORT_SUBDIR = "export"


@dataclass
class TrainingHooks:
    """Stage-specific pieces of the loop. Every rank calls them at the same points."""

    # (images, labels) from the loader -> the micro-batch the loss function gets (e.g. Mixup); CPU
    prepare: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
    # after every optimizer step, with that step's last micro-batch (EMA update, reconstruction grids)
    after_step: Callable[[StepOutput, Any], None] | None = None
    # extra checkpoint state (e.g. EMA weights) and how to put it back on resume
    state: Callable[[], dict[str, Any]] | None = None
    load_state: Callable[[dict[str, Any]], None] | None = None


class StageTrainer:
    """Loader + engine + the step loop with checkpoints, reports, metrics and the loss curve."""

    def __init__(
        self,
        job: JobConfig,
        settings: LoopSettings,
        ctx: StageContext,
        *,
        stage: str,
        model: torch.nn.Module,
        loss_fn: LossFn,
        manifest_url: str,
        role: str,
        augment: dict[str, Any] | None,
        hooks: TrainingHooks | None = None,
    ) -> None:
        from pipeline.data.stream import build_loader

        self.job, self.settings, self.ctx, self.stage = job, settings, ctx, stage
        self.hooks = hooks or TrainingHooks()
        self.rank, self.world_size = setup_distributed(ctx)
        self.loader = build_loader(
            manifest_url, role, batch_size=settings.batch_size, img_size=job.model.img_size, rank=self.rank,
            world_size=self.world_size, num_workers=job.data.loader_workers, seed=job.seed, augment=augment,
            on_error=job.data.on_error, decode=job.data.decode,
        )  # batches arrive normalised on this process's training device (pipeline.data.device)
        steps_per_epoch = self.loader.batches_per_epoch // settings.grad_accum_steps
        if steps_per_epoch < 1:
            raise PipelineError(
                f"stage {stage}: {manifest_url} gives {self.loader.batches_per_epoch} batches per rank per epoch, "
                f"fewer than grad_accum_steps={settings.grad_accum_steps}: lower batch_size or accumulation"
            )
        self.engine: TrainEngine = build_engine(model, job.deepspeed, settings.optimizer, settings,
                                                loss_fn=loss_fn, steps_per_epoch=steps_per_epoch)
        self.ckpt_dir = os.path.join(ctx.work_dir, CHECKPOINT_SUBDIR)
        self.epoch = 0
        self.batch_in_epoch = 0  # loader batches consumed in self.epoch
        self.skipped_before = 0  # skipped samples in finished epochs (this rank)
        self.loss_curve: list[tuple[int, float]] = []
        self.last_metrics: dict[str, float] = {}
        self.saved_step: int | None = None
        self.saved_folder = self.ckpt_dir  # where the tag of saved_step lives (resume_dir after a resume)
        self.train_seconds = 0.0
        self._last_save_time = time.monotonic()
        logger.info("%s: %s, %d batches/epoch/rank, %d steps in all", stage, manifest_url,
                    self.loader.batches_per_epoch, self.engine.total_steps)

    # ----------------------------------------------------------------- resume

    def resume(self) -> bool:
        """Restore engine state and data position from the newest checkpoint that verifies; True when
        one was found. Collective."""
        selection = self._resume_source()
        if selection is None:
            seed_everything(self.job.seed + 1 + self.rank)  # ranks draw different masks/mixup/drop-path
            return False
        state = self.engine.resume_from(selection)
        folder, tag = selection.folder, selection.tag
        if selection.rejected:  # the warning lines are logged by select; the stage run says so too
            self.ctx.set_tag(FALLBACK_TAG, f"resumed from {tag}, not from newer checkpoints that failed "
                             f"verification: {' | '.join(selection.rejected)}"[:MAX_TAG_CHARS])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.skipped_before = int(state.get("skipped_before", 0))
        self.loss_curve = [(int(s), float(v)) for s, v in state.get("loss_curve", [])]
        self.saved_step, self.saved_folder = self.engine.step, folder
        if self.hooks.load_state is not None:
            self.hooks.load_state(state)
        logger.info("%s: resumed from %s/%s at step %d (epoch %d, batch %d)", self.stage, folder, tag,
                    self.engine.step, self.epoch, self.batch_in_epoch)
        return True

    def _resume_source(self) -> Selection | None:
        """The tag to resume from: the newest that verifies in ctx.resume_dir (Ray's copy of the last
        reported checkpoint; it must have one when given), else in ctx.work_dir/checkpoints, falling back
        to older kept tags. Rank 0 lists and decides, so all ranks load the same step (or all start
        fresh); each rank checks a share of the files in its own copy of the folder."""
        try:
            return select_checkpoint([self.ctx.resume_dir, self.ckpt_dir], require_first=True)
        except PipelineError as err:
            raise PipelineError(f"stage {self.stage}: {err}") from None

    # ----------------------------------------------------------------- loop

    def fit(self) -> None:
        engine, accum = self.engine, self.settings.grad_accum_steps
        started = time.perf_counter()
        while not engine.finished:
            self.loader.set_epoch(self.epoch, min(self.batch_in_epoch, self.loader.batches_per_epoch))
            micro: list[Any] = []
            batches: Iterator[Any] = iter(self.loader)
            try:
                for images, labels in _timed(batches, engine.timer):
                    self.batch_in_epoch += 1
                    micro.append(self.hooks.prepare(images, labels) if self.hooks.prepare else (images, labels))
                    if len(micro) < accum:
                        continue
                    out = engine.train_step(micro, skipped_samples=self.skipped_before + self.loader.skipped)
                    self._after_step(out, micro[-1])
                    micro = []
                    if engine.finished:
                        break
                else:  # the epoch ran out (leftover micro-batches short of an accumulation are dropped)
                    self.skipped_before += self.loader.skipped
                    self.epoch += 1
                    self.batch_in_epoch = 0
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # stops the DataLoader workers of an unfinished epoch now
        self.train_seconds += time.perf_counter() - started

    def _after_step(self, out: StepOutput, batch: Any) -> None:
        timer = self.engine.timer
        self.ctx.at_step(out.step)
        self.loss_curve.extend(out.losses)  # log steps: the losses read since the last read (no per-step sync)
        if self.hooks.after_step is not None:
            with timer.section("hooks"):
                self.hooks.after_step(out, batch)
        if out.metrics:
            with timer.section("log"):
                self.last_metrics = {**out.metrics, "epoch": float(self.epoch)}
                self.ctx.log_metrics(self.last_metrics, out.step)
                if "loss" in out.metrics:  # a log step (a probe-only step, e.g. firing rates, has no progress)
                    from pipeline.console import progress_line

                    per_step = self.settings.batch_size * self.world_size * self.settings.grad_accum_steps
                    logger.info("%s", progress_line(self.stage, out.step, self.engine.total_steps, out.metrics,
                                                    per_step))
        if (self.engine.should_checkpoint() or self._checkpoint_is_due(bool(out.metrics))) and not self.engine.finished:
            with timer.section("checkpoint"):
                self.save()
                self._report({**self.last_metrics, "step": float(out.step)})

    # ----------------------------------------------------------------- checkpoints and reports

    def _checkpoint_is_due(self, log_step: bool) -> bool:
        """checkpoint.every_minutes: rank 0's clock decides for all ranks (the report is collective), and
        only at log steps, which read metrics from the device anyway (no extra host sync per step)."""
        minutes = self.settings.checkpoint.every_minutes
        if minutes is None or not log_step:
            return False
        due = time.monotonic() - self._last_save_time >= 60 * minutes
        return bool(broadcast_from_rank0(due))

    def save(self) -> str:
        """Checkpoint the current step (collective); returns the tag folder."""
        self.loss_curve.extend(self.engine.read_losses())  # steps since the last log step; raises after a NaN
        extra = {"skipped_before": self.skipped_before, "loss_curve": self.loss_curve,
                 **(self.hooks.state() if self.hooks.state else {})}
        folder = self.engine.save_checkpoint(self.ckpt_dir, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                                             extra=extra)
        if not os.path.exists(os.path.join(self.ckpt_dir, ckpt.LATEST_FILE)):
            # a rank-private folder (Ray gives each rank its own work_dir): the writer rank prunes only its
            # own folder, so this rank drops its old tags itself
            ckpt.prune_tags(self.ckpt_dir, self.settings.checkpoint.keep_last, ckpt.tag_for_step(self.engine.step))
        self.saved_step, self.saved_folder = self.engine.step, self.ckpt_dir
        self._last_save_time = time.monotonic()
        return folder

    def save_final(self) -> None:
        if self.saved_step != self.engine.step:
            with self.engine.timer.section("checkpoint"):
                self.save()

    def _report(self, metrics: dict[str, float]) -> None:
        """ctx.report with a folder holding only the newest tag (+ `latest`), on every rank."""
        tag = ckpt.tag_for_step(self.engine.step)  # its folder holds its digest.json: the report carries it
        staging = os.path.join(self.ctx.work_dir, "reported", f"{tag}-rank{self.rank}")
        shutil.rmtree(staging, ignore_errors=True)
        _link_tree(os.path.join(self.saved_folder, tag), os.path.join(staging, tag))
        with open(os.path.join(staging, ckpt.LATEST_FILE), "w") as f:
            f.write(tag)
        try:
            self.ctx.report(metrics, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def report_final(self, metrics: dict[str, float]) -> None:
        """The end-of-stage report, with the final checkpoint (call after the export is written)."""
        self._report({**self.last_metrics, **metrics, "step": float(self.engine.step)})

    # ----------------------------------------------------------------- the stage's outputs

    def export(self, config: dict[str, Any], state: dict[str, torch.Tensor] | None = None,
               prefix: str | None = None) -> tuple[str, str]:
        """{output_url}/export from the consolidated fp32 weights (or `state`), written by rank 0.
        Collective; returns (url, weights sha256) on every rank."""
        url = join_url(self.ctx.output_url, EXPORT_SUBDIR)
        return url, self.engine.export(url, config, state=state, prefix=prefix)

    def finish(self, metrics: dict[str, float], loss_title: str, images: Sequence[str] = (),
               outputs: Sequence[str] = ()) -> None:
        """Rank 0 publishes the loss curve, `images` and the summary metrics; every rank then makes the
        final report (with the final checkpoint). Collective."""
        if self.rank == 0:
            csv_path, png_path = write_loss_curve(self.loss_curve, os.path.join(self.ctx.work_dir, "artifacts"),
                                                  loss_title)
            publish(self.ctx, artifacts=[csv_path], images=[png_path, *images], outputs=outputs,
                    metrics=metrics, step=self.engine.step)
        self.report_final(metrics)

    def first_batch(self) -> Any:
        """The first loader batch of the current epoch (e.g. to draw pictures after a resume at the end)."""
        self.loader.set_epoch(self.epoch, 0)
        batches = iter(self.loader)
        try:
            return next(batches)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    # ----------------------------------------------------------------- summaries

    def final_loss(self) -> float:
        """Mean loss over the last log interval (steps), or nan before any step."""
        tail = self.loss_curve[-self.settings.log_every_steps:]
        return sum(v for _, v in tail) / len(tail) if tail else float("nan")

    def summary_metrics(self) -> dict[str, float]:
        """The stage's summary, with the loop timer's run totals: `time_total/<section>` seconds and
        `time_count/<section>` times entered (one checkpoint save = total / count)."""
        timing = {}
        for name, (seconds, count) in self.engine.timer.totals().items():
            timing[f"time_total/{name}"], timing[f"time_count/{name}"] = seconds, float(count)
        return {"final_loss": self.final_loss(), "steps": float(self.engine.step),
                "epochs_seen": float(self.epoch) + self.batch_in_epoch / max(self.loader.batches_per_epoch, 1),
                "train_seconds": self.train_seconds, **timing}


def _timed(batches: Iterator[Any], timer: Any) -> Iterator[Any]:
    """The loader's batches, the wait for each timed as `data_wait` (the loop's other sections are
    timed where they run)."""
    while True:
        with timer.section("data_wait"):
            batch = next(batches, _END)
        if batch is _END:
            return
        yield batch


_END = object()


def _link_tree(src: str, dst: str) -> None:
    """Copy a folder as hard links (same filesystem), falling back to real copies."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)
