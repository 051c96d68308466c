"""Sweeps: one job run per cell and seed, under one parent MLflow run, and a comparison at the end.

A spec's `sweep:` block names cells (`cells:` with `set:` overrides, and/or a `grid:` of axes whose
every combination is a cell) and seeds. Each (cell, seed) is the spec with the cell's overrides and
that seed: a job of its own (`{name}.{cell}.s{seed}`), run by the same runner, so the stage cache
shares whatever cells have in common (shards, and e.g. one pretraining for every SSL cell of a
seed). A cell whose job already FINISHED (same resolved spec) is reused, not run again.

Concurrency uses Ray tasks: each cell's job is driven from a task (num_cpus=0; its Ray Train
workers hold the CPUs), up to `sweep.max_concurrent` at once and as many as the cluster has CPUs
for. Ray Tune would add trial schedulers and its own result store that we do not need: the runner
already caches stages and records everything in MLflow. Cells whose first stage has the same
fingerprint never run at the same time (the first one runs it, the others then reuse it).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Any

from pipeline import tracking
from pipeline.config import JobConfig, with_overrides
from pipeline.errors import PipelineError
from pipeline.runner.job import run_job, spec_digest
from pipeline.runner.plan import PlannedStage, plan_job
from pipeline.runner.preflight import check_job
from pipeline.runner.resolve import selected_stages

logger = logging.getLogger(__name__)

SWEEP_TAG = "pipeline.sweep"  # on the parent run: the sweep's name; on a cell's job run: the cell
SEED_TAG = "pipeline.sweep.seed"


@dataclass
class CellRun:
    cell: str
    seed: int
    job: JobConfig
    job_run_id: str | None = None
    reused: bool = False
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> metrics
    wall_s: float | None = None


def expand(job: JobConfig) -> list[CellRun]:
    """Every (cell, seed) as its own validated job; a bad override is one line naming cell and key."""
    sweep = job.sweep
    assert sweep is not None
    cells = [(c.name, dict(c.set), c.seeds) for c in sweep.cells]
    if sweep.grid:
        axes = list(sweep.grid.values())
        for combo in itertools.product(*(list(axis.items()) for axis in axes)):
            cells.append(("-".join(name for name, _ in combo), {k: v for _, o in combo for k, v in o.items()},
                          None))
    names = [name for name, _, _ in cells]
    if len(set(names)) != len(names):
        raise PipelineError(f"sweep: cell names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    base = job.model_copy(update={"sweep": None})
    runs = []
    for name, overrides, seeds in cells:
        for seed in _seeds(job.seed, sweep.seeds if seeds is None else seeds):
            cell_job = with_overrides(base, {"seed": seed, **overrides, "name": f"{job.name}.{name}.s{seed}"},
                                      f"sweep cell {name}")
            runs.append(CellRun(name, seed, cell_job))
    return runs


def _seeds(first: int, seeds: int | list[int]) -> list[int]:
    return list(range(first, first + seeds)) if isinstance(seeds, int) else list(seeds)


def plan_sweep(job: JobConfig, only: list[str] | None = None,
               unchecked: list[str] | None = None) -> list[tuple[CellRun, list[PlannedStage]]]:
    """Every cell's plan; inputs no cell could check go to `unchecked` once each, naming the first cell
    that needs them (cells share most inputs), or are logged as warnings when no list is given."""
    planned, listed = [], set()
    for run in expand(job):
        problems: list[str] | None = None if unchecked is None else []
        planned.append((run, plan_job(run.job, only, problems)))
        for problem in problems or []:
            if problem not in listed:
                listed.add(problem)
                unchecked.append(f"cell {run.cell} seed {run.seed}: {problem}")
    return planned


def run_sweep(job: JobConfig, backend_factory, only: list[str] | None = None, job_file: str | None = None):
    """Runs every cell (backend_factory() gives each cell job its backend); returns (parent run id, runs)."""
    runs = expand(job)
    tracker = tracking.prepare(job.mlflow)
    for run in runs:  # every cell is checked before any of them starts work
        check_job(run.job, selected_stages(run.job, only), tracker)
    parent = _open_parent(tracker, job, only, job_file)
    try:
        _run_all(runs, backend_factory, only, job_file, parent, tracker, job.sweep.max_concurrent)
        for run in runs:
            run.metrics, run.wall_s = cell_metrics(tracker, run.job_run_id)
        publish_comparison(tracker, parent, runs)
    except BaseException as err:
        from pipeline.runner.job import ending

        tracker.finish_run(parent, *ending(err))
        raise
    tracker.finish_run(parent, "FINISHED")
    return parent, runs


def _open_parent(tracker, job: JobConfig, only, job_file) -> str:
    from pipeline.runner.job import open_job_run

    stages = selected_stages(job.model_copy(update={"sweep": None}), only)
    return open_job_run(tracker, job, stages, {"pipeline.job_file": job_file or "", SWEEP_TAG: job.name})


def _run_all(runs: list[CellRun], backend_factory, only, job_file, parent: str, tracker, max_concurrent: int):
    pending = []
    for run in runs:
        finished = _finished_job_run(tracker, run.job, selected_stages(run.job, only))
        if finished is not None:
            run.job_run_id, run.reused = finished, True
            logger.info("sweep: %s seed %d already finished (job run %s): reused", run.cell, run.seed, finished)
        else:
            pending.append(run)
    room = _room(runs[0].job, max_concurrent) if pending else 1
    tags = lambda run: {SWEEP_TAG: run.cell, SEED_TAG: str(run.seed)}  # noqa: E731
    if room <= 1:
        for run in pending:
            logger.info("sweep: cell %s seed %d", run.cell, run.seed)
            run.job_run_id = run_job(run.job, backend_factory(), only, job_file, parent, tags(run)).job_run_id
        return
    _run_concurrently(pending, only, job_file, parent, tags, room)


def _run_concurrently(pending: list[CellRun], only, job_file, parent, tags, room: int) -> None:
    """Cells as Ray tasks, `room` at a time; cells sharing their first stage's fingerprint wait for the
    first of them (which runs that stage once)."""
    import ray

    from pipeline.runner.ray_backend import RayBackend

    @ray.remote(num_cpus=0, max_retries=0)
    def drive(cell_job: dict, cell_tags: dict) -> str:
        return run_job(JobConfig.model_validate(cell_job), RayBackend(), only, job_file, parent,
                       cell_tags).job_run_id

    def first_fingerprint(run: CellRun) -> str | None:
        planned = plan_job(run.job, only)
        return planned[0].fingerprint if planned else None

    leaders: dict[str | None, CellRun] = {}
    waiting: list[tuple[CellRun, CellRun | None]] = []
    for run in pending:
        key = first_fingerprint(run)
        leader = leaders.get(key) if key is not None else None
        waiting.append((run, leader))
        if key is not None and leader is None:
            leaders[key] = run
    running: dict[Any, CellRun] = {}
    done: set[int] = set()
    while waiting or running:
        for item in list(waiting):
            run, leader = item
            if len(running) >= room:
                break
            if leader is None or id(leader) in done:
                waiting.remove(item)
                running[drive.remote(run.job.model_dump(mode="json"), tags(run))] = run
                logger.info("sweep: cell %s seed %d started (%d running)", run.cell, run.seed, len(running))
        ready, _ = ray.wait(list(running), num_returns=1)
        run = running.pop(ready[0])
        run.job_run_id = ray.get(ready[0])
        done.add(id(run))


def _room(job: JobConfig, max_concurrent: int) -> int:
    """How many cells the cluster has CPUs for (each: scaling.num_workers x cpus_per_worker)."""
    if max_concurrent <= 1:
        return 1
    import ray

    from pipeline.runner.ray_backend import connect_ray

    connect_ray(job)
    cpus = ray.cluster_resources().get("CPU", 1)
    need = job.scaling.num_workers * job.scaling.cpus_per_worker
    return max(1, min(max_concurrent, int(cpus // need)))


def _finished_job_run(tracker, job: JobConfig, stages: list[str]) -> str | None:
    query = (f"tags.`{tracking.JOB_TAG}` = '{job.name}' and tags.`{tracking.SPEC_TAG}` = "
             f"'{spec_digest(job, stages)}' and attributes.status = 'FINISHED'")
    found = tracker.client.search_runs([tracker.experiment_id], query, order_by=["attributes.start_time DESC"],
                                       max_results=1)
    return found[0].info.run_id if found else None


def cell_metrics(tracker, job_run_id: str) -> tuple[dict[str, dict[str, float]], float | None]:
    """Per stage, the metrics of the run the job ran or reused; and the job run's wall time."""
    client = tracker.client
    job_run = client.get_run(job_run_id)
    children = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{job_run_id}'")
    by_stage = {r.data.tags[tracking.STAGE_TAG]: r for r in children if tracking.STAGE_TAG in r.data.tags}
    for key, value in job_run.data.tags.items():
        if key.startswith("pipeline.") and key.endswith(".reused_run_id"):
            by_stage.setdefault(key.split(".")[1], client.get_run(value))
    info = job_run.info
    wall = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    return {stage: dict(run.data.metrics) for stage, run in by_stage.items()}, wall


# --------------------------------------------------------------------------- the comparison

COLUMNS = ("cell", "seeds", "top1_mean", "top1_std", "knn_top1", "probe_top1", "energy_uj_per_image", "wall_s")


def comparison(runs: list[CellRun]) -> list[dict[str, Any]]:
    rows = []
    for cell in dict.fromkeys(r.cell for r in runs):
        mine = [r for r in runs if r.cell == cell]
        top1 = [v for v in (r.metrics.get("evaluate", {}).get("top1") for r in mine) if v is not None]
        mean_of = lambda stage, key, scale=1.0, mine=mine: _mean(mine, stage, key, scale)  # noqa: E731

        walls = [r.wall_s for r in mine if r.wall_s is not None]
        rows.append({
            "cell": cell, "seeds": len(mine),
            "top1_mean": statistics.fmean(top1) if top1 else None,
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else (0.0 if top1 else None),
            "knn_top1": mean_of("pretrain", "knn_top1"), "probe_top1": mean_of("probe", "top1"),
            "energy_uj_per_image": mean_of("evaluate", "energy_pj_per_image", 1e-6),
            "wall_s": statistics.fmean(walls) if walls else None,
        })
    return rows


def _mean(runs: list[CellRun], stage: str, key: str, scale: float) -> float | None:
    values = [v * scale for v in (r.metrics.get(stage, {}).get(key) for r in runs) if v is not None]
    return statistics.fmean(values) if values else None


def markdown(rows: list[dict[str, Any]]) -> str:
    def show(value: Any, percent: bool = False) -> str:
        if value is None:
            return "-"
        return f"{value:.2%}" if percent else (f"{value:.3g}" if isinstance(value, float) else str(value))

    lines = ["| cell | seeds | top-1 (mean +- std) | kNN top-1 | probe top-1 | energy (uJ/image) | wall (s/seed) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        top1 = "-" if r["top1_mean"] is None else f"{r['top1_mean']:.2%} +- {r['top1_std']:.2%}"
        lines.append(f"| {r['cell']} | {r['seeds']} | {top1} | {show(r['knn_top1'], True)} | "
                     f"{show(r['probe_top1'], True)} | {show(r['energy_uj_per_image'])} | "
                     f"{show(None if r['wall_s'] is None else round(r['wall_s']))} |")
    return "\n".join(lines)


def publish_comparison(tracker, parent: str, runs: list[CellRun]) -> str:
    """comparison.csv, comparison.md and comparison.png (top-1 with error bars) on the parent run."""
    import csv

    rows = comparison(runs)
    folder = tempfile.mkdtemp(prefix="sweep-")
    with open(os.path.join(folder, "comparison.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    with open(os.path.join(folder, "comparison.md"), "w") as f:
        f.write(table + "\n")
    _bar_plot(rows, os.path.join(folder, "comparison.png"))
    tracker.log_artifacts(parent, folder, "comparison")
    tracker.set_tags(parent, {"pipeline.sweep.cells": str(len(rows)), "pipeline.sweep.runs": str(len(runs))})
    print(table, flush=True)
    return table


def _bar_plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["top1_mean"] is not None]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(shown) + 1.5), 3.6), dpi=100)
    ax.bar(range(len(shown)), [100 * r["top1_mean"] for r in shown],
           yerr=[100 * r["top1_std"] for r in shown], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(shown)), [r["cell"] for r in shown], rotation=30, ha="right")
    ax.set_ylabel("top-1 (%)")
    low = min((100 * (r["top1_mean"] - r["top1_std"]) for r in shown), default=0)
    ax.set_ylim(max(0, math.floor(low / 10) * 10 - 10), 100)
    ax.set_title("sweep: top-1 per cell (mean +- std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

