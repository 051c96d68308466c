"""benchmarks/lif_speed.py's measurements as JSON, with the issue's goals: fused >= 5x, >= 60% of copy.

    python benchmarks/gpu_lif.py --json FILE [lif_speed.py options, e.g. --T 1 4 --elements 64M]

Runs `lif_speed.main` (without recording to docs/BENCHMARKS.md) and measures the device's copy bandwidth
per dtype with its `copy_bandwidth_gbs`, so each fused row gets its speed-up over the reference
forward+backward and its share of the copy rate. The goals are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import lif_speed  # noqa: E402

GOAL_SPEEDUP, GOAL_COPY_SHARE = 5.0, 0.60


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--elements", default="64M")
    parser.add_argument("--iters", type=int, default=20)
    args, passed = parser.parse_known_args(argv)  # the rest (--T, --dtype, ...) goes to lif_speed as is
    bench = lif_speed.main([*passed, "--device", args.device, "--elements", args.elements,
                            "--iters", str(args.iters), "--no-record"])
    device = torch.device(args.device)
    copy_gbs = {}
    if device.type == "cuda":
        for dtype in sorted({r["dtype"] for r in bench}):
            copy_gbs[dtype] = lif_speed.copy_bandwidth_gbs(device, lif_speed._size(args.elements),
                                                           getattr(torch, dtype), args.iters)
    reference = {(r["dtype"], r["T"]): r["fwd_bwd_ms"] for r in bench if r["impl"] == "reference"}
    for row in bench:
        row["speedup"] = reference[(row["dtype"], row["T"])] / row["fwd_bwd_ms"]
        row["copy_share"] = row["gbs"] / copy_gbs[row["dtype"]] if row["dtype"] in copy_gbs else None
    fused = [r for r in bench if r["impl"] == "fused"]
    result = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "copy_gbs": copy_gbs, "rows": bench, "fused_ran": bool(fused),
        "goals": {"speedup": GOAL_SPEEDUP, "copy_share": GOAL_COPY_SHARE},
        "goals_met": {"speedup": all(r["speedup"] >= GOAL_SPEEDUP for r in fused) if fused else None,
                      "copy_share": all(r["copy_share"] >= GOAL_COPY_SHARE for r in fused) if fused else None},
    }
    args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
