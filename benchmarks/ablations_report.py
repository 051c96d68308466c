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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._report import hardware  # noqa: E402

DOC = ROOT / "docs" / "ABLATIONS.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="jobs/ablations.yaml", help="the sweep's job spec [jobs/ablations.yaml]")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT}/mlflow.db"))
    parser.add_argument("--experiment", default=None, help="default: the spec's mlflow.experiment")
    parser.add_argument("--wall-s", type=float, default=None, help="the sweep's wall time, if measured outside")
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from pipeline.config import load_job

    job = load_job(ROOT / args.spec if not Path(args.spec).is_absolute() else args.spec)
    pretrain = job.stages.pretrain
    source = job.data.build.source if job.data.build else "manifests"
    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment or job.mlflow.experiment).experiment_id
    (parent,) = client.search_runs([experiment], f"tags.`pipeline.sweep` = '{job.name}' and attributes.status = "
                                   "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(client.download_artifacts(parent.info.run_id, "comparison/comparison.md", tmp)).read_text()
    curves = knn_curves(client, experiment, job.name, since_ms=parent.info.start_time)
    wall = args.wall_s or (parent.info.end_time - parent.info.start_time) / 1000
    command = "make ablations (= `python -m pipeline run jobs/ablations.yaml`)" if args.spec == "jobs/ablations.yaml" \
        else f"`python -m pipeline run {args.spec}`"
    lines = [
        f"## {source.capitalize()} ablations ({dt.date.today().isoformat()})", "",
        f"- command: {command}, then `python benchmarks/ablations_report.py --spec {args.spec}`",
        f"- hardware: {hardware()}; {job.scaling.num_workers} Ray Train workers per stage, gloo, DeepSpeed "
        f"ZeRO-{job.deepspeed.zero_stage} fp32",
        f"- sweep MLflow run {parent.info.run_id}; wall time {wall / 60:.1f} min for the whole sweep",
        f"- top-1 over the {source} validation images; kNN: the pretrain stage's last `knn_top1` (weighted "
        f"kNN, k {pretrain.knn_k}, T {pretrain.knn_temperature}, {pretrain.knn_bank_size}-image bank, "
        f"{pretrain.knn_eval_size} val queries); probe: the linear probe's top-1",
        *([f"- note: {args.note}"] if args.note else []), "", table.strip(), "",
        "kNN top-1 during pretraining (step: value), per pretraining run:", "",
        *[f"- {name}: {curve}" for name, curve in curves], "",
    ]
    text = DOC.read_text() if DOC.exists() else "# Ablations\n"
    DOC.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))
    print("\n".join(lines))
    return 0


def knn_curves(client, experiment: str, sweep: str, since_ms: int = 0) -> list[tuple[str, str]]:
    """knn_top1 by step of the sweep's pretrain runs (job names `{sweep}.{cell}.s{seed}`), oldest first.

    Runs reused from an earlier sweep of the same spec started before `since_ms`; they are listed too."""
    runs = client.search_runs([experiment], "tags.`pipeline.stage` = 'pretrain' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    out = []
    for run in runs:
        if not run.data.tags.get("pipeline.job", "").startswith(f"{sweep}."):
            continue
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "knn_top1"))
        if history:
            out.append((run.data.tags.get("pipeline.job", run.info.run_id),
                        ", ".join(f"{step}: {value:.1%}" for step, value in history)))
    return out


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    sys.exit(main())
