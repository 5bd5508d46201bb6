"""Measure what a whole model pays beyond the sum of its ops' entries on a device: the
cost of fetching weights that do not stay in the cache (`lut.latency.CacheContext`).

Two measurements, both of ordinary `.tflite` models, so a phone's `benchmark_model` takes
them as the host does:

1. *The fetch sweep*: models of k parallel fully-connected layers (256 → 256, 263 KB of
   weights each) on one shared input, for k = 1 … 32. While k copies fit in the cache a
   branch costs what one alone does; beyond it, each branch pays for fetching its weights.
   The cold cost per byte is `fetch_ns_per_byte`; the total size at which half of that
   cost shows is the cache's effective size, `cache_bytes`.
2. *The plateau*: the LUT's own models, measured whole, against their entries' sum; the
   share of their weights that misses, where the ramp says it should be high.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from lut.latency import CacheContext, LatencyEstimator
from lut.table import Measurement
from profiler.errors import ProfilerError

__all__ = ["FETCH_BRANCHES", "fit_plateau", "measure_cache_context", "whole_model_us"]

_FETCH_UNITS = 256
FETCH_BRANCHES = (1, 2, 4, 6, 8, 10, 12, 16, 24, 32)
_REPEATS = 3
_PLATEAU_RANGE = (0.2, 1.5)


def _branch_model(branches: int, units: int = _FETCH_UNITS) -> bytes:
    import keras

    from profiler.convert import keras_to_tflite

    x = keras.Input((units,), batch_size=1)
    outputs = [keras.layers.Dense(units, name=f"branch{i}")(x) for i in range(branches)]
    return keras_to_tflite(keras.Model(x, outputs if branches > 1 else outputs[0]))


def whole_model_us(measure, name: str, model: bytes, repeats: int = _REPEATS) -> float:
    """The lowest of `repeats` medians of `model` measured by `measure` (a `Device.measure`-like
    callable): load only ever adds time."""
    medians = []
    for _ in range(repeats):
        for _, result in measure([(name, model)]):
            if not isinstance(result, Measurement):
                raise ProfilerError(f"{name} could not be measured: {result.error}")
            medians.append(result.median_us)
    return min(medians)


def measure_cache_context(measure, invoke_overhead_us: float) -> CacheContext:
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
    for low, high in zip(ks, ks[1:]):
        if share[low] < 0.5 <= share[high]:
            k = low + (0.5 - share[low]) / (share[high] - share[low]) * (high - low)
            return k * weight_bytes
    return ks[-1] * weight_bytes


@dataclasses.dataclass(frozen=True)
class WholeModel:
    """A model the LUT is for, measured whole: what `fit_plateau` fits on."""

    name: str
    specs: tuple
    measured_us: float


def fit_plateau(context: CacheContext, estimator: LatencyEstimator, models: Sequence[WholeModel]) -> CacheContext:
    """`context` with its plateau fitted on whole-model measurements of models far enough up
    the ramp to tell (half of it or more); unchanged when none is."""
    ratios = []
    for model in models:
        full = dataclasses.replace(context, plateau=1.0)
        share = full.miss_fraction(model.specs)
        cost = full.weight_cost_us(model.specs, share)
        if share >= 0.5 and cost > 0:
            ratios.append((model.measured_us - estimator.entries_us(model.specs)) / cost)
    if not ratios:
        return context
    low, high = _PLATEAU_RANGE
    return dataclasses.replace(context, plateau=min(high, max(low, statistics.median(ratios))))
