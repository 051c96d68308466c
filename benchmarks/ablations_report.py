"""docs/ABLATIONS.md from a finished `python -m pipeline run jobs/ablations.yaml` (= make ablations).

    python benchmarks/ablations_report.py [--tracking-uri sqlite:///mlflow.db] [--experiment spikformer-ablations]
        [--wall-s SECONDS] [--note TEXT]

Reads the newest FINISHED sweep run of the experiment: its comparison table (the artifact the sweep
wrote), every cell's kNN curve from the pretrain runs (knn_top1 by step), and writes a dated section
with the command, the hardware and the table. Nothing here is measured again: it reports what the
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
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT}/mlflow.db")
    parser.add_argument("--experiment", default="spikformer-ablations")
    parser.add_argument("--wall-s", type=float, default=None, help="the sweep's wall time, if measured outside")
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment).experiment_id
    (parent,) = client.search_runs([experiment], "tags.`pipeline.sweep` = 'ablations' and attributes.status = "
                                   "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(client.download_artifacts(parent.info.run_id, "comparison/comparison.md", tmp)).read_text()
    curves = knn_curves(client, experiment)
    wall = args.wall_s or (parent.info.end_time - parent.info.start_time) / 1000
    lines = [
        f"## Digits ablations ({dt.date.today().isoformat()})", "",
        "- command: `make ablations` (= `python -m pipeline run jobs/ablations.yaml`), then "
        "`python benchmarks/ablations_report.py`",
        f"- hardware: {hardware()}; 2 Ray Train workers per stage, gloo, DeepSpeed ZeRO-2 fp32",
        f"- sweep MLflow run {parent.info.run_id}; wall time {wall / 60:.1f} min for the whole sweep",
        "- top-1 over the 360 digits validation images; kNN: the pretrain stage's last `knn_top1` (weighted "
        "kNN, k 20, T 0.07, 300-image bank, 200 val queries); probe: the linear probe's top-1",
        *([f"- note: {args.note}"] if args.note else []), "", table.strip(), "",
        "kNN top-1 during pretraining (step: value), per pretraining run:", "",
        *[f"- {name}: {curve}" for name, curve in curves], "",
    ]
    text = DOC.read_text() if DOC.exists() else "# Ablations\n"
    DOC.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))
    print("\n".join(lines))
    return 0


def knn_curves(client, experiment: str) -> list[tuple[str, str]]:
    runs = client.search_runs([experiment], "tags.`pipeline.stage` = 'pretrain' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    out = []
    for run in runs:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "knn_top1"))
        if history:
            out.append((run.data.tags.get("pipeline.job", run.info.run_id),
                        ", ".join(f"{step}: {value:.1%}" for step, value in history)))
    return out


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    sys.exit(main())
