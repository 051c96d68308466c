"""Rank-0 writers of a stage's small outputs: files copied to the stage's output URL, the loss curve,
and artifacts/images/metrics logged through the stage context's callbacks."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import fsspec

from pipeline.data.fsutil import join_url

if TYPE_CHECKING:
    from pipeline.stages.context import StageContext


def put_file(local_path: str, url: str) -> str:
    """Copy a local file to an fsspec URL (local folders are created); returns the URL."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fs.put_file(local_path, path)
    return url


def write_loss_curve(points: list[tuple[int, float]], folder: str, title: str) -> tuple[str, str]:
    """loss_curve.csv and loss_curve.png in `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    csv_path, png_path = os.path.join(folder, "loss_curve.csv"), os.path.join(folder, "loss_curve.png")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows(points)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if points:
        ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return csv_path, png_path


def publish(ctx: StageContext, *, artifacts: Sequence[str] = (), images: Sequence[str] = (),
            outputs: Sequence[str] = (), metrics: dict[str, float] | None = None, step: int = 0) -> None:
    """Rank 0: copy every file into ctx.output_url; log `artifacts` as files and `images` as images of
    the stage's run (`outputs` are only copied); log `metrics` at `step`."""
    if ctx.rank != 0:
        return
    for path in (*artifacts, *images, *outputs):
        put_file(path, join_url(ctx.output_url, os.path.basename(path)))
    for path in artifacts:
        ctx.log_artifact(path, None)
    for path in images:
        ctx.log_image(path, os.path.basename(path))
    if metrics:
        ctx.log_metrics(metrics, step)
