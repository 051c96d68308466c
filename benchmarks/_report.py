"""What every benchmark script shares: a hardware line and appending a section to docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def cpu_name() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def hardware(device: str = "cpu") -> str:
    """e.g. 'AMD EPYC, 2 CPUs, torch threads: 1, torch 2.14.1' or the CUDA device name."""
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"{cpu_name()}, {os.cpu_count()} CPUs, torch threads: {torch.get_num_threads()}, torch {torch.__version__}"


def record_section(title: str, script: str, details: list[str], table: str, note: str | None = None,
                   device: str = "cpu") -> None:
    """Append `## title (date)` with hardware + load average, the exact command, details, note, table."""
    import datetime as dt
    import shlex
    import sys

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"## {title} ({dt.date.today().isoformat()})",
        "",
        f"- hardware: {hardware(device)}; load average at the end: {load}",
        f"- command: `python benchmarks/{script} {shlex.join(sys.argv[1:])}`",
        *[f"- {line}" for line in details],
    ]
    if note:
        lines.append(f"- note: {note}")
    append_section([*lines, "", table, ""])


def append_section(lines: list[str]) -> None:
    """Append one dated section (already formatted lines) to docs/BENCHMARKS.md."""
    if not DOC.exists():
        DOC.write_text("# Benchmarks\n")
    with DOC.open("a") as fh:
        fh.write("\n" + "\n".join(lines).rstrip("\n") + "\n")
    print(f"appended to {DOC}")
