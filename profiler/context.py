"""Measure what a whole model pays beyond the sum of its ops' entries on a device: the
cost of fetching weights that do not stay in the cache (`lut.latency.CacheContext`).

*The fetch sweep*: models of k parallel fully-connected layers (256 → 256, 263 KB of
weights each) on one shared input, for k = 1 … 32, ordinary `.tflite` models that a phone's
`benchmark_model` takes as the host does. While k copies fit in the cache a branch costs
what one alone does; beyond it, each branch pays for fetching its weights. The cold cost
per byte is `fetch_ns_per_byte`; the total size at which half of that cost shows is the
cache's effective size, `cache_bytes`.

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

__all__ = ["FETCH_BRANCHES", "measure_cache_context", "whole_model_us"]

_FETCH_UNITS = 256
FETCH_BRANCHES = (1, 2, 4, 6, 8, 10, 12, 16, 24, 32)
_REPEATS = 3


def _branch_model(branches: int, units: int = _FETCH_UNITS) -> bytes:
    import keras  # TensorFlow takes seconds to import: only a sweep pays for it

    x = keras.Input((units,), batch_size=1)
    outputs = [keras.layers.Dense(units, name=f"branch{i}")(x) for i in range(branches)]
    return keras_to_tflite(keras.Model(x, outputs if branches > 1 else outputs[0]))


def whole_model_us(measure: Measure, name: str, model: bytes, repeats: int = _REPEATS) -> float:
    """The lowest of `repeats` medians of `model` measured by `measure` (a `Device.measure`-like
    callable): load only ever adds time."""
    medians: list[float] = []
    for _ in range(repeats):
        for _, result in measure([(name, model)]):
            if not isinstance(result, Measurement):
                raise ProfilerError(f"{name} could not be measured: {result.error}")
            medians.append(result.median_us)
    return min(medians)


def measure_cache_context(measure: Measure, invoke_overhead_us: float) -> CacheContext:
    """Run the fetch sweep with `measure` (see the module doc) and return the device's context."""
    weight_bytes = 4 * (_FETCH_UNITS * _FETCH_UNITS + _FETCH_UNITS)
    per_branch = {}
    for k in FETCH_BRANCHES:
        total = whole_model_us(measure, f"fetch{k}", _branch_model(k))
        per_branch[k] = max(total - invoke_overhead_us, 1e-3) / k
    warm = per_branch[1]
    cold = statistics.median(per_branch[k] for k in FETCH_BRANCHES[-3:])
    if cold <= 1.05 * warm:  # everything fits: this device's cache holds 8 MB
        return CacheContext(0.0, weight_bytes * FETCH_BRANCHES[-1])
    fetch_ns_per_byte = (cold - warm) * 1000 / weight_bytes
    return CacheContext(fetch_ns_per_byte, _half_way_bytes(per_branch, warm, cold, weight_bytes))


def _half_way_bytes(per_branch: dict[int, float], warm: float, cold: float, weight_bytes: int) -> float:
    """The total weight size at which a branch pays half its cold fetch cost (interpolated)."""
    share = {k: (us - warm) / (cold - warm) for k, us in per_branch.items()}
    ks = sorted(share)
    for low, high in itertools.pairwise(ks):
        if share[low] < 0.5 <= share[high]:
            k = low + (0.5 - share[low]) / (share[high] - share[low]) * (high - low)
            return k * weight_bytes
    return ks[-1] * weight_bytes
