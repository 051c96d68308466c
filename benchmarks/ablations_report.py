"""docs/ABLATIONS.md from a finished ablation sweep (`make ablations` = jobs/ablations.yaml on digits, or
jobs/ablations_shapes.yaml on the generated shapes).

    python benchmarks/ablations_report.py [--spec jobs/ablations.yaml] [--tracking-uri sqlite:///mlflow.db]
        [--wall-s SECONDS] [--note TEXT]

Reads the newest FINISHED sweep run of the spec's experiment and sweep name: its comparison table (the
artifact the sweep wrote), every cell's kNN curve from the pretrain runs of that sweep (knn_top1 by
step), and writes a dated section with the command, the hardware and the table. The data set, the kNN
sizes and the experiment come from the spec. Nothing here is measured again: it reports what the
sweep recorded in MLflow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._report import cpu_name  # noqa: E402

DOC = ROOT / "docs" / "ABLATIONS.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="jobs/ablations.yaml", help="the sweep's job spec [jobs/ablations.yaml]")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT}/mlflow.db"))
    parser.add_argument("--experiment", default=None, help="default: the spec's mlflow.experiment")
    parser.add_argument("--wall-s", type=float, default=None, help="the sweep's wall time, if measured outside")
    parser.add_argument("--note", default="")
    parser.add_argument("--partial", action="store_true", help="table from the finished cells, even if the sweep "
                        "finished (default when no sweep run has finished)")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from pipeline.config import load_job

    job = load_job(ROOT / args.spec if not Path(args.spec).is_absolute() else args.spec)
    pretrain = job.stages.pretrain
    source = job.data.build.source if job.data.build else "manifests"
    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment or job.mlflow.experiment).experiment_id
    parents = client.search_runs([experiment], f"tags.`pipeline.sweep` = '{job.name}' and attributes.status = "
                                 "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    if parents and not args.partial:
        parent = parents[0]
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(client.download_artifacts(parent.info.run_id, "comparison/comparison.md", tmp)).read_text()
        wall = args.wall_s or (parent.info.end_time - parent.info.start_time) / 1000
        sweep_line = f"sweep MLflow run {parent.info.run_id}; wall time {wall / 60:.1f} min for the whole sweep"
    else:  # the sweep has not finished: the same table from the cells that have
        table, done, total = partial_table(client, experiment, job)
        wall = f"; wall time {args.wall_s / 60:.1f} min so far" if args.wall_s else ""
        sweep_line = f"PARTIAL sweep: {done} of {total} cell runs finished{wall}"
    curves = knn_curves(client, experiment, job.name)
    rates = firing_rates(client, experiment, job.name)
    command = "make ablations (= `python -m pipeline run jobs/ablations.yaml`)" if args.spec == "jobs/ablations.yaml" \
        else f"`python -m pipeline run {args.spec}`"
    lines = [
        f"## {source.capitalize()} ablations: {job.name} ({dt.date.today().isoformat()})", "",
        f"- command: {command}, then `python benchmarks/ablations_report.py --spec {args.spec}`",
        f"- hardware: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; per stage "
        f"{_count(job.scaling.num_workers, 'Ray Train worker')} of {job.scaling.cpus_per_worker:g} Ray CPU, "
        f"{_count(job.sweep.max_concurrent, 'cell')} at once, gloo, DeepSpeed ZeRO-{job.deepspeed.zero_stage} fp32",
        f"- {sweep_line}",
        f"- top-1 over the {source} validation images; kNN: the pretrain stage's last `knn_top1` (weighted "
        f"kNN, k {pretrain.knn_k}, T {pretrain.knn_temperature}, {pretrain.knn_bank_size}-image bank, "
        f"{pretrain.knn_eval_size} val queries); probe: the linear probe's top-1",
        *([f"- note: {args.note}"] if args.note else []), "", table.strip(), "",
        "kNN top-1 during pretraining (step: value), per pretraining run:", "",
        *[f"- {name}: {curve}" for name, curve in curves], "",
        "Train-mode firing rate of the encoder's LIF layers during pretraining (mean over layers [lowest layer, "
        "highest layer]), first and last logged step:", "",
        *[f"- {name}: {text}" for name, text in rates], "",
    ]
    text = DOC.read_text() if DOC.exists() else "# Ablations\n"
    DOC.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))
    print("\n".join(lines))
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def partial_table(client, experiment: str, job) -> tuple[str, int, int]:
    """The sweep's comparison table (pipeline.runner.sweep's) over the cell runs that FINISHED so far."""
    from types import SimpleNamespace

    from pipeline.runner.sweep import cell_metrics, comparison, expand, markdown

    tracker = SimpleNamespace(client=client, experiment_id=experiment)
    runs, finished = expand(job), []
    for run in runs:
        found = client.search_runs([experiment], f"tags.`pipeline.job` = '{run.job.name}' and attributes.status = "
                                   "'FINISHED'", order_by=["attributes.start_time DESC"])
        found = [r for r in found if "pipeline.stage" not in r.data.tags]  # the job run, not its stage runs
        if found:
            run.job_run_id = found[0].info.run_id
            run.metrics, run.wall_s = cell_metrics(tracker, run.job_run_id)
            finished.append(run)
    return markdown(comparison(finished)), len(finished), len(runs)


def pretrain_runs(client, experiment: str, sweep: str) -> list:
    """The sweep's FINISHED pretrain runs (job names `{sweep}.{cell}.s{seed}`), oldest first."""
    runs = client.search_runs([experiment], "tags.`pipeline.stage` = 'pretrain' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    return [run for run in runs if run.data.tags.get("pipeline.job", "").startswith(f"{sweep}.")]


def firing_rates(client, experiment: str, sweep: str) -> list[tuple[str, str]]:
    out = []
    for run in pretrain_runs(client, experiment, sweep):
        layers = [key for key in run.data.metrics if key.startswith("firing_rate_train/")]
        by_step: dict[int, list[float]] = {}
        for key in layers:
            for m in client.get_metric_history(run.info.run_id, key):
                by_step.setdefault(m.step, []).append(m.value)
        if by_step:
            first, last = min(by_step), max(by_step)
            show = lambda v: f"{sum(v) / len(v):.2%} [{min(v):.2%}, {max(v):.2%}]"  # noqa: E731
            out.append((run.data.tags["pipeline.job"], f"step {first}: {show(by_step[first])}; "
                        f"step {last}: {show(by_step[last])} ({len(layers)} layers)"))
    return out


def knn_curves(client, experiment: str, sweep: str) -> list[tuple[str, str]]:
    """knn_top1 by step of the sweep's pretrain runs, oldest first (runs reused from an earlier sweep of the
    same spec included)."""
    out = []
    for run in pretrain_runs(client, experiment, sweep):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "knn_top1"))
        if history:
            out.append((run.data.tags.get("pipeline.job", run.info.run_id),
                        ", ".join(f"{step}: {value:.1%}" for step, value in history)))
    return out


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    sys.exit(main())
