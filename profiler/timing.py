"""How the host times one model: `TimingPolicy`, and `time_interpreter` that follows it.

Pure timing over anything with an `invoke()` method; the interpreter comes from
`profiler.host` (LiteRT).  Kept apart from the backend so that `open_device`'s callers can
choose a policy without importing a backend.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Protocol

from lut.table import Measurement

__all__ = ["Invocable", "TimingPolicy", "time_interpreter"]


@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    """How long to time one model: warm up, then timed samples until the median is stable.

    A sample times enough back-to-back invocations to span `sample_us` (one, for a model
    slower than that) and is their mean: reading a clock costs time too (the thread CPU
    clock is a system call), and an op of a few microseconds would otherwise carry that
    cost in its LUT entry, where a whole model pays it once. Samples go on until at least
    `min_runs` samples and `min_seconds` have passed; then until the median of the first
    and of the second half agree within `stable_pct` percent (or `resolution_us`, below
    which sub-microsecond ops cannot agree better), or `max_seconds` is spent.
    """

    warmup_runs: int = 3
    sample_us: float = 50.0
    min_runs: int = 15
    min_seconds: float = 0.02
    max_seconds: float = 0.5
    stable_pct: float = 1.0
    resolution_us: float = 0.1


class Invocable(Protocol):
    """What is timed: an interpreter with its tensors allocated and inputs set."""

    def invoke(self) -> None: ...


def time_interpreter(interpreter: Invocable, policy: TimingPolicy = TimingPolicy(),
                     clock: Callable[[], int] = time.perf_counter_ns) -> Measurement:
    """Time `interpreter.invoke()` under `policy` with `clock` (nanoseconds); deadlines are wall time."""
    invoke, wall = interpreter.invoke, time.perf_counter_ns
    warmup_start = clock()
    for _ in range(policy.warmup_runs):
        invoke()
    warmup_us = (clock() - warmup_start) / 1e3 / max(policy.warmup_runs, 1)
    repeats = range(max(1, min(1000, int(policy.sample_us / max(warmup_us, 1e-3)))))
    samples: list[float] = []
    start = wall()
    deadline_min = start + policy.min_seconds * 1e9
    deadline_max = start + policy.max_seconds * 1e9
    while True:
        t0 = clock()
        for _ in repeats:
            invoke()
        elapsed = clock() - t0
        if elapsed > 0:  # a thread CPU clock can read equal across a migration between cores
            samples.append(elapsed / 1e3 / len(repeats))
        enough = len(samples) >= policy.min_runs and (now := wall()) >= deadline_min
        if enough and (now >= deadline_max or _stable(samples, policy)):
            break
    return Measurement(
        median_us=float(statistics.median(samples)),
        mean_us=float(statistics.fmean(samples)),
        min_us=float(min(samples)),
        max_us=float(max(samples)),
        std_us=float(statistics.pstdev(samples)),
        count=len(samples),
    )


def _stable(samples: list[float], policy: TimingPolicy) -> bool:
    half = len(samples) // 2
    a, b = statistics.median(samples[:half]), statistics.median(samples[half:])
    return abs(a - b) <= max(policy.stable_pct / 100 * min(a, b), policy.resolution_us)
