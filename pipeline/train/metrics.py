"""Throughput, step time and peak memory between two log points of a training loop."""

from __future__ import annotations

import resource
import sys
import time

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
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._since = time.perf_counter()
        self._steps = 0
        self._images = 0.0
        self._compute_s = 0.0
        self._loss_sum = 0.0
        self._aux: dict[str, list[float]] = {}

    def add(self, *, loss: float, images: float, compute_s: float, aux: dict[str, float] | None = None) -> None:
        self._steps += 1
        self._images += images
        self._compute_s += compute_s
        self._loss_sum += loss
        for key, value in (aux or {}).items():
            self._aux.setdefault(key, []).append(float(value))

    def summary(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self._since, 1e-9)
        steps = max(self._steps, 1)
        out = {
            "loss": self._loss_sum / steps,
            "images_per_s": self._images / wall,
            "step_time": self._compute_s / steps,
            "data_time": max(wall - self._compute_s, 0.0) / steps,
        }
        out.update({key: sum(values) / len(values) for key, values in self._aux.items()})
        return out
