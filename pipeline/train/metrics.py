"""Throughput, step time, loss and peak memory between two log points of a training loop."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated by this process's tensors; CPU: peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class IntervalMeter:
    """Accumulates per-step numbers and turns them into averages once per log interval.

    `images_per_s` uses wall time since the previous log (data loading included); `step_time` is the
    mean time spent inside train_step; `data_time` is the rest (waiting for the loader, logging).
    Per-step values that live on the device (the loss, a loss function's tensor metrics) are kept
    there and read at `summary()`: a log step, which reads the device anyway.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._since = time.perf_counter()
        self._steps = 0
        self.images = 0  # this rank's images in the interval
        self._compute_s = 0.0
        self._losses: list[float] = []
        self._aux: dict[str, list[Any]] = {}

    def add(self, *, images: int, compute_s: float, aux: Mapping[str, Any] | None = None) -> None:
        self._steps += 1
        self.images += images
        self._compute_s += compute_s
        for key, value in (aux or {}).items():
            self._aux.setdefault(key, []).append(value.detach() if isinstance(value, torch.Tensor) else float(value))

    def add_loss(self, loss: float) -> None:
        self._losses.append(loss)

    def summary(self, images_total: float) -> dict[str, float]:
        """The interval's averages; `images_total`: images of all ranks in the interval."""
        wall = max(time.perf_counter() - self._since, 1e-9)
        steps = max(self._steps, 1)
        out = {
            "loss": sum(self._losses) / len(self._losses) if self._losses else float("nan"),
            "images_per_s": images_total / wall,
            "step_time": self._compute_s / steps,
            "data_time": max(wall - self._compute_s, 0.0) / steps,
        }
        for key, values in self._aux.items():
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            numbers = [float(v) for v in values if not isinstance(v, torch.Tensor)]
            if tensors:  # one device read per key
                numbers += torch.stack([t.float().reshape(()) for t in tensors]).tolist()
            out[key] = sum(numbers) / len(numbers)
        return out
