"""Estimate a model's latency from a LUT: the sum of its ops' entries.

Every entry is the latency of one op run alone, so each includes the cost of one
interpreter invocation; a model pays that once.  `build_lut` measures it into the LUT's
`invoke_overhead_us`, and the estimate of n ops is Σ entries − (n − 1) · overhead. The
overhead is what an invocation costs beyond its ops: the intercept of a chain of trivial
ops (`profiler.build_lut.InvokeOverhead`), not the latency of one trivial op,
which also holds that op's own cost inside a model (measured here: 0.46 µs alone, 0.42 µs
of it the invocation; subtracting all 0.46 per op had the LUT miss MobileNetV2 α=0.5 at
32 px, 67 ops of about 0.5 µs, by −10%).

A spec missing from the LUT is interpolated from measured entries of the same op family
(every field equal but the channel counts).  SIMD kernels compute output channels in
register tiles (XNNPACK: 8 on NEON, 16 on AVX-512; the GPU delegate: slices of 4), so a
conv's latency is a staircase in its output channels and close to linear in its input
channels: measured on this machine's CPU, L(cout=24) = L(cout=32) within 1%.  So a missing
entry takes, along cout (and c of a depthwise conv), the value of the next measured count
above it — the top of its tile when the LUT's step is at most the tile — and along cin
(and c of element-wise ops) the linear interpolation between its measured neighbours.
`tests/test_estimate.py` checks this rule on held-out measured entries.  Outside the measured range the estimate raises, naming the spec:
extrapolating latency across hardware tile boundaries is how LUTs go wrong.

An entry is measured with the op run again and again, its weights warm in the core's
cache; inside a whole model, every other op's weights and activations pass through that
cache between two runs of this one. Once what one invocation touches (its weights W and
part of its activations A) outgrows the cache, each op's weights come from the next level,
and some of the activation traffic too: measured on this project's development CPU (2 MiB
L2), whole MobileNets at 32 px ran up to 2.2× their entries' sum. `CacheContext` adds that
cost: the bytes fetched (W and a share of A) times the device's fetch cost per byte (both
the cost and the cache's effective size are measured by `profiler.context` when the LUT is
built), and each op's own state (its code, packed-weight and indirection tables: fetched like
`op_state_bytes` of weights), scaled by the fraction that misses: `plateau` times the share of
the cache sweep's cold cost that the device showed at that many bytes touched (the sweep's
`ramp`, measured when the LUT is built), or, for a LUT built before the ramp was measured, 0
while what is touched is below `ramp_start` times the cache, rising linearly to `plateau` at
`ramp_end` times it. The ramp is the device's own: on an Intel Ice Lake VM (1.25 MiB L2) the
sweep's share rose from 0 at 0.75 MiB to 0.94 at 2 MiB, against the 1.25–3 MiB the fitted
linear ramp put there from the development CPU's 2.36 MiB effective cache, and the LUT with
the linear ramp was +11%/+7% over 30 prunings of MobileNetV1/V2 α=0.5 at 32 px on average
(17% of them within ±5%), with the measured ramp +7%/+1% (43%/77%; docs/profiler-figures.md).
The op's state is priced at the device's fetch cost, not at its invocation overhead (0.72 of
them, as it was): the two are the same on the CPU the shape was fitted on (10.9 KB at its
0.028 ns a byte and 0.42 µs), but on one whose next level is fast a missing op costs little
(an AMD EPYC VM, 0.0037 ns a byte: MobileNetV2 α=0.5 at 32 px and 30 prunings of it measured
+26% and +28% on average by the LUT with the op priced in overheads, +6% and +14% by bytes,
docs/profiler-figures.md).
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lut.keras_specs import specs_of_keras
from lut.models import load_model
from lut.spec import CHANNEL_PRESERVING_OPS, LayerSpec, LutError
from lut.table import LatencyTable
from lut.tflite_ops import specs_of_tflite

__all__ = ["CONTEXT_META_KEY", "CacheContext", "LatencyEstimator", "estimate_latency_ms", "specs_of"]

CONTEXT_META_KEY = "cache_context"


@dataclasses.dataclass(frozen=True)
class CacheContext:
    """What a whole model pays for weights its ops cannot keep in the cache (see the module doc).

    `fetch_ns_per_byte`, `cache_bytes` (the effective size: where half the fetch cost shows)
    and `ramp` (the share of the cold cost shown at each size the sweep measured) are the
    device's, measured; the rest of the shape (`plateau`, the activations' shares,
    `op_state_bytes`, and the linear ramp of `ramp_start` and `ramp_end`, in units of
    `cache_bytes`, that stands in for a `ramp` not measured) was fitted (scipy's robust least
    squares on relative error) on 120 random prunings of MobileNetV1 and V2 α=0.5 at 32 and
    128 px, measured whole and interleaved on this project's development CPU
    (`adapter.validate_lut`, seed 0) and checked on fresh LUTs and other prunings (seed 1);
    other devices may need other shapes, which `adapter.validate_lut` shows.
    """

    fetch_ns_per_byte: float
    cache_bytes: float
    # (bytes touched, share of the cold cost paid) as the fetch sweep measured them, rising; empty
    # in a LUT built before it was measured, whose ramp is the linear one of ramp_start and ramp_end
    ramp: tuple[tuple[float, float], ...] = ()
    ramp_start: float = 0.53
    ramp_end: float = 1.29
    plateau: float = 0.62
    activation_reach: float = 0.44  # the share of activation bytes counted in what an invocation touches
    activation_miss: float = 0.1  # the share of activation bytes fetched like missed weights
    op_state_bytes: float = 10_900.0  # what each op fetches again when it misses (its code and tables), as weight bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "ramp", tuple((float(x), float(y)) for x, y in self.ramp))
        values = [v for v in dataclasses.astuple(self) if not isinstance(v, tuple)]
        xs, shares = [x for x, _ in self.ramp], [y for _, y in self.ramp]
        if not all(isinstance(v, (int, float)) and v == v and v >= 0 for v in values) or self.cache_bytes <= 0 \
                or self.ramp_end <= self.ramp_start or not all(0 <= y <= 1 for y in shares) \
                or any(b <= a for a, b in itertools.pairwise(xs)) or any(b < a for a, b in itertools.pairwise(shares)):
            raise LutError(f"A cache context needs non-negative figures, a positive cache, ramp_start < ramp_end and a "
                           f"ramp of rising bytes and shares within 0..1. Received: {self!r}.")

    def miss_fraction(self, specs: Sequence[LayerSpec]) -> float:
        """The fraction of the weights a model running `specs` fetches from beyond the cache."""
        touched = sum(s.weight_bytes + self.activation_reach * s.activation_bytes for s in specs)
        if self.ramp:
            return self.plateau * _piecewise_linear(touched, self.ramp)
        relative = touched / self.cache_bytes
        return self.plateau * min(1.0, max(0.0, (relative - self.ramp_start) / (self.ramp_end - self.ramp_start)))

    def weight_cost_us(self, specs: Sequence[LayerSpec]) -> float:
        """The time fetching what misses the cache costs, in microseconds: the bytes, and each
        op's own state (`op_state_bytes` an op)."""
        fetched = sum(s.weight_bytes + self.activation_miss * s.activation_bytes + self.op_state_bytes for s in specs)
        return self.miss_fraction(specs) * self.fetch_ns_per_byte * fetched / 1000

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> CacheContext | None:
        text = meta.get(CONTEXT_META_KEY)
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as e:
            raise LutError(f"The LUT's {CONTEXT_META_KEY} is malformed ({e}). Received: {text!r}.") from e


def _piecewise_linear(x: float, points: Sequence[tuple[float, float]]) -> float:
    """The line through `points` (rising x) at x; their first and last y beyond them."""
    xs = [px for px, _ in points]
    i = bisect.bisect_right(xs, x)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return _lerp(x, x0, x1, y0, y1)


def _family(spec: LayerSpec) -> LayerSpec:
    """The spec with its channel counts erased: entries of one family differ only in channels."""
    return spec.replace(cin=1, cout=1)


class LatencyEstimator:
    """Latency of specs from one LUT, with interpolation; build once, query many times."""

    def __init__(self, table: LatencyTable):
        self.table = table
        self.refresh()

    def refresh(self) -> None:
        """Reload the entries (after more were measured into the table)."""
        meta = self.table.meta
        self.dtype = self.table.dtype
        self.invoke_overhead_us = float(meta.get("invoke_overhead_us", 0.0))
        self.context = CacheContext.from_meta(meta)
        self._us: dict[LayerSpec, float] = self.table.latencies_us()
        grids: dict[LayerSpec, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
        for spec, us in self._us.items():
            grids[_family(spec)][spec.cin][spec.cout] = us
        self._grids = grids

    def spec_us(self, spec: LayerSpec) -> float:
        """Latency of `spec` in microseconds: measured, or interpolated from its neighbours."""
        measured = self._us.get(spec)
        if measured is not None:
            return measured
        if spec.dtype != self.dtype:
            raise LutError(
                f"The LUT {self.table.path} holds {self.dtype} ops; {spec.key} is {spec.dtype}. Estimate the model "
                f"with a LUT built with `--dtype {spec.dtype}`, or convert it for the LUT's {self.dtype}."
            )
        grid = self._grids.get(_family(spec))
        if not grid:
            raise LutError(
                f"The LUT {self.table.path} has no entry of the kind of {spec.key}. Measure it with "
                "`python -m profiler.build_lut` for this model (same resolution) on the LUT's device."
            )
        return _interpolate(spec, grid, self.table.path)

    def total_us(self, specs: Iterable[LayerSpec]) -> float:
        """Latency of a model running `specs`: their entries less all but one invocation
        overhead, plus (with a cache context) what fetching its weights costs."""
        specs = list(specs)
        missed = self.context.weight_cost_us(specs) if self.context else 0.0
        return self.entries_us(specs) + missed

    def entries_us(self, specs: Sequence[LayerSpec]) -> float:
        """The sum of the specs' entries less all but one invocation overhead (no cache context)."""
        latencies = [self.spec_us(spec) for spec in specs]
        return sum(latencies) - self.invoke_overhead_us * max(len(latencies) - 1, 0)

    def missing(self, specs: Iterable[LayerSpec]) -> list[LayerSpec]:
        """Specs this LUT can neither look up nor interpolate."""
        out = []
        for spec in dict.fromkeys(specs):
            try:
                self.spec_us(spec)
            except LutError:
                out.append(spec)
        return out


def _bracket(values: Sequence[int], x: int) -> tuple[int, int] | None:
    """The nearest values below and above x (equal when x is one of them)."""
    i = bisect.bisect_left(values, x)
    if i < len(values) and values[i] == x:
        return x, x
    if i == 0 or i == len(values):
        return None
    return values[i - 1], values[i]


def _lerp(x: float, x0: float, x1: float, y0: float, y1: float) -> float:
    return y0 if x0 == x1 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


# ops whose channels (of a depthwise conv: all; of the others: the output ones) are tiled
_TILED_OPS = frozenset({"depthwise_conv2d"})


def _interpolate(spec: LayerSpec, grid: dict[int, dict[int, float]], path: str) -> float:
    def outside(name: str, value: int, measured: Iterable[int]) -> LutError:
        return LutError(
            f"{spec.key} is outside the channels measured in {path}: {name} {value}, measured {name} "
            f"{min(measured)}..{max(measured)}; extend the LUT with `python -m profiler.build_lut` for the model it "
            "belongs to (same resolution and classes)."
        )

    if spec.op in CHANNEL_PRESERVING_OPS:
        around = _bracket(sorted(grid), spec.cin)
        if around is None:
            raise outside("c", spec.cin, grid)
        c0, c1 = around
        if spec.op in _TILED_OPS:
            return grid[c1][c1]
        return _lerp(spec.cin, c0, c1, grid[c0][c0], grid[c1][c1])
    cins = sorted(grid)
    around_in = _bracket(cins, spec.cin)
    if around_in is None:
        raise outside("cin", spec.cin, cins)
    rows = []
    for cin in dict.fromkeys(around_in):
        couts = sorted(grid[cin])
        around_out = _bracket(couts, spec.cout)
        if around_out is None:
            raise outside("cout", spec.cout, couts)
        rows.append((cin, grid[cin][around_out[1]]))  # the top of the output-channel tile
    if len(rows) == 1:
        return rows[0][1]
    (i0, y0), (i1, y1) = rows
    return _lerp(spec.cin, i0, i1, y0, y1)


def specs_of(model: Any, dtype: str = "float32") -> list[LayerSpec]:
    """The specs of a Keras model converted for `dtype` (`lut.keras_specs.specs_of_keras`), or of a
    `.tflite` given as bytes or as a file path (its own dtype)."""
    if isinstance(model, (bytes, bytearray)):
        return specs_of_tflite(bytes(model))
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if path.endswith(".tflite"):
            try:
                with open(path, "rb") as f:
                    return specs_of(f.read())
            except OSError as e:
                raise LutError(f"Cannot read {path}: {e.strerror}.") from e
        return specs_of(load_model(path), dtype)
    return specs_of_keras(model, dtype=dtype)


def estimate_latency_ms(model: Any, table: LatencyTable) -> float:
    """Σ LUT(op) over the ops of `model` (Keras model, .keras/.tflite path, or .tflite bytes), in ms.
    A Keras model is estimated as converted for the LUT's dtype."""
    return LatencyEstimator(table).total_us(specs_of(model, table.dtype)) / 1000
