"""Where a training loop's time goes, by named section, read out at log steps.

    timer = LoopTimer(device)
    with timer.section("data_wait"):                 # host wall time
        batch = next(batches)
    with timer.section("forward_backward", device=True):   # device time (CUDA events on a GPU)
        loss = ...; loss.backward()
    timer.step_done()
    ...
    if log_step:
        metrics.update(timer.interval())   # {"time/data_wait": s per step, ..., "time/wall": s per step}

Why not torch.profiler or DeepSpeed's wall_clock_breakdown: both synchronise the device around
every timed region (the profiler also records every op), so they change what they measure; this
timer costs two perf_counter calls per section on the host. On CUDA a `device=True` section records
a pair of CUDA events on the current stream instead (no synchronisation); their elapsed times are
read at `interval()`, which waits for the last event: a log step, which reads the step statistics
from the device anyway. Host sections on a GPU measure how long the host was busy or blocked, not
the device: their sum need not equal the wall time there (the device runs behind the host).

Host sections may nest: a section's time excludes the sections opened inside it (the trainer's
`hooks` section holds pretraining's `knn`), so on the CPU the sections never count a second twice.

`interval()` gives seconds per optimizer step of every section seen since the previous call, plus
`time/wall` (wall seconds per step), `time/process_cpu` (CPU seconds of this process per step, all its
threads, DataLoader worker processes not included: on shared cores it moves less than the wall) and,
on the CPU where sections are disjoint and synchronous, `time/other` (wall not covered by any
section); on CUDA `time/device_unaccounted` instead: wall minus the device sections' device time, i.e.
the device idle (waiting for data, the host, a checkpoint) plus kernels outside the timed sections.
`totals()` gives the whole run's seconds and counts per section (per-event costs such as one
checkpoint save: total / count).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

PREFIX = "time/"


class LoopTimer:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._total: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)
        self._open: list[float] = []  # per open host section: seconds of the sections nested in it
        self._device_names: set[str] = set()  # sections timed on the device (CUDA events)
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._since = time.perf_counter()
        self._cpu_since = time.process_time()
        self._steps = 0
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def _add(self, name: str, seconds: float) -> None:
        self._seconds[name] += seconds
        self._total[name] += seconds

    @contextlib.contextmanager
    def section(self, name: str, *, device: bool = False) -> Iterator[None]:
        """Time the block as `name` (exclusive of the host sections nested in it)."""
        self._count[name] += 1
        if device and self._cuda:
            self._device_names.add(name)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
            return
        started = time.perf_counter()
        self._open.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self._add(name, elapsed - self._open.pop())
            if self._open:
                self._open[-1] += elapsed

    def step_done(self) -> None:
        self._steps += 1

    def _resolve_events(self) -> None:
        if self._events:
            self._events[-1][2].synchronize()  # the newest event: all earlier ones are done too
            for name, start, end in self._events:
                self._add(name, start.elapsed_time(end) / 1e3)
            self._events.clear()

    def interval(self) -> dict[str, float]:
        """Seconds per step of each section since the previous call (or the start); starts a new interval."""
        self._resolve_events()
        wall = time.perf_counter() - self._since
        steps = max(self._steps, 1)
        out = {f"{PREFIX}{name}": seconds / steps for name, seconds in sorted(self._seconds.items())}
        out[f"{PREFIX}wall"] = wall / steps
        out[f"{PREFIX}process_cpu"] = (time.process_time() - self._cpu_since) / steps
        if self._cuda:
            busy = sum(seconds for name, seconds in self._seconds.items() if name in self._device_names)
            out[f"{PREFIX}device_unaccounted"] = max(wall - busy, 0.0) / steps
        else:
            out[f"{PREFIX}other"] = max(wall - sum(self._seconds.values()), 0.0) / steps
        self._reset_interval()
        return out

    def totals(self) -> dict[str, tuple[float, int]]:
        """{section: (seconds, times entered)} over the whole run (events of the open interval included)."""
        self._resolve_events()
        return {name: (self._total[name], self._count[name]) for name in sorted(self._count)}
