"""Measure what a whole model pays beyond the sum of its ops' entries on a device: the
cost of fetching weights that do not stay in the cache (`lut.latency.CacheContext`).

*The fetch sweep*: models of k parallel fully-connected layers (256 → 256, 263 KB of
weights each) on one shared input, for k = 1 … 32, ordinary `.tflite` models that a phone's
`benchmark_model` takes as the host does, measured in interleaved rounds. While k copies fit
in the cache a branch costs what one alone does; beyond it, each branch pays for fetching its
weights. The cold cost per byte is `fetch_ns_per_byte`; the share of it shown at each total
size is the device's `ramp` (made rising: load only adds time, so a dip is noise), and the
size at which half of it shows is the cache's effective size, `cache_bytes`. The ramp is
measured, not assumed, because caches differ in more than size: on an Intel Ice Lake VM
(1.25 MiB L2, 2026-12-07) the share went 0.02, 0.14, 0.37, 0.69, 0.86, 0.94 at 0.75, 1, 1.25,
1.5, 1.75 and 2 MiB, where the linear ramp fitted on the development CPU (2 MiB L2) had it
rise from 0.53 to 1.29 times the effective size; k steps by one branch up to 8 to resolve it.

Fitting the ramp's plateau on the LUT's own models measured whole was tried and left out:
one whole-model measurement on a shared machine varies too much for the fit to settle
(docs/profiler-figures.md).
"""
from __future__ import annotations

import itertools
import statistics

from lut.latency import CacheContext
from lut.table import Measurement
from profiler.convert import keras_to_tflite
from profiler.devices import Measure
from profiler.errors import ProfilerError

__all__ = ["FETCH_BRANCHES", "measure_cache_context"]

_FETCH_UNITS = 256
FETCH_BRANCHES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32)
_REPEATS = 3


def _branch_model(branches: int, units: int = _FETCH_UNITS) -> bytes:
    import keras  # TensorFlow takes seconds to import: only a sweep pays for it

    x = keras.Input((units,), batch_size=1)
    outputs = [keras.layers.Dense(units, name=f"branch{i}")(x) for i in range(branches)]
    return keras_to_tflite(keras.Model(x, outputs if branches > 1 else outputs[0]))


def _lowest_medians(measure: Measure, models: dict[str, bytes], rounds: int = _REPEATS) -> dict[str, float]:
    """Each model's lowest median over `rounds` interleaved rounds of `measure` (a
    `Device.measure`-like callable), each model measured by a call of its own (through a
    monitor: between two looks at the reference): load only ever adds time, and interleaving
    spreads a drift over every model instead of putting it on a few."""
    medians: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for item in models.items():
            for name, result in measure([item]):
                if not isinstance(result, Measurement):
                    raise ProfilerError(f"{name} could not be measured: {result.error}")
                medians[name].append(result.median_us)
    return {name: min(values) for name, values in medians.items()}


def measure_cache_context(measure: Measure, invoke_overhead_us: float) -> CacheContext:
    """Run the fetch sweep with `measure` (see the module doc) and return the device's context."""
    weight_bytes = 4 * (_FETCH_UNITS * _FETCH_UNITS + _FETCH_UNITS)
    totals = _lowest_medians(measure, {f"fetch{k}": _branch_model(k) for k in FETCH_BRANCHES})
    per_branch = {k: max(totals[f"fetch{k}"] - invoke_overhead_us, 1e-3) / k for k in FETCH_BRANCHES}
    warm = per_branch[1]
    cold = statistics.median(per_branch[k] for k in FETCH_BRANCHES[-3:])
    if cold <= 1.05 * warm:  # everything fits: this device's cache holds 8 MB
        return CacheContext(0.0, weight_bytes * FETCH_BRANCHES[-1])
    shares = itertools.accumulate((min(max((per_branch[k] - warm) / (cold - warm), 0.0), 1.0) for k in FETCH_BRANCHES),
                                  max)
    ramp = tuple((k * weight_bytes, share) for k, share in zip(FETCH_BRANCHES, shares))
    return CacheContext((cold - warm) * 1000 / weight_bytes, _half_way_bytes(ramp), ramp=ramp)


def _half_way_bytes(ramp: tuple[tuple[float, float], ...]) -> float:
    """The total weight size at which the ramp reaches half the cold fetch cost (interpolated)."""
    for (x0, low), (x1, high) in itertools.pairwise(ramp):
        if low < 0.5 <= high:
            return x0 + (0.5 - low) / (high - low) * (x1 - x0)
    return ramp[-1][0]
