"""What every search asks the LUT: what a model costs, what the budget means in the LUT's terms.

`Budget` is the user's budget (a fraction of the original's latency, or milliseconds) and its
calibration into the LUT's terms (`Budget.lut_ms`); `estimate_ms` is the LUT estimate of a
Keras model, pruned or not; `ensure_estimable` measures on the device the entries a search
needs and the LUT lacks (`profiler.build_lut.build_lut`); `GroupLatency` estimates a model
with one channel group resized without walking the model again. The tolerances say when a
measured fraction meets the budget, and when it is over-pruned.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from adapter.errors import AdapterError
from lut.keras_specs import channel_slopes, specs_of_keras
from lut.spec import LayerSpec, LutError
from lut.table import LatencyTable
from profiler.build_lut import build_lut
from profiler.devices import Device
from profiler.monitor import MonitorPolicy

__all__ = [
    "MAX_RECALIBRATIONS",
    "OVER_BUDGET_TOLERANCE",
    "OVER_PRUNED",
    "Budget",
    "Estimator",
    "GroupLatency",
    "ensure_estimable",
    "estimate_ms",
    "model_specs",
]

MAX_RECALIBRATIONS = 3  # times a search may rescale the budget in the LUT's terms by a measurement
OVER_BUDGET_TOLERANCE = 0.03  # a measured fraction within 3% above the budget meets it
OVER_PRUNED = 0.10  # a measured fraction more than 10% under the budget is over-pruned


class Estimator(Protocol):
    """What a search needs of a LUT estimator (`lut.latency.LatencyEstimator` is one)."""

    table: LatencyTable
    dtype: str  # the LUT's: what a model is converted to for the device ("float32" or "int8")

    def total_us(self, specs: Sequence[LayerSpec]) -> float: ...

    def missing(self, specs: Iterable[LayerSpec]) -> list[LayerSpec]: ...

    def refresh(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Budget:
    """A latency budget: `value` ms, or (`relative`) a fraction of the original model's
    latency: measured on the device when that is known, else estimated (see `lut_ms`)."""

    value: float
    relative: bool

    def __post_init__(self) -> None:
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise AdapterError(f"A budget must be a positive number; received {self.value!r}.")
        if self.relative and self.value >= 1:
            raise AdapterError(
                f"A relative budget must be a fraction of the original latency in (0, 1); received "
                f"{self.value}. Write an absolute budget with a unit, e.g. '{self.value}ms'."
            )

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'0.5' (half the original estimate), '50%', or an absolute '12ms' / '12 ms'."""
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|%)?\s*", str(text))
        if match is None:
            raise AdapterError(
                f"A budget is a fraction of the original latency ('0.5'), a percentage ('50%') or "
                f"milliseconds ('12ms'); received {text!r}."
            )
        value, unit = float(match[1]), match[2]
        return cls(value, relative=False) if unit == "ms" else cls(value / 100 if unit == "%" else value, relative=True)

    def ms(self, original_ms: float) -> float:
        """The budget in ms for a model whose latency is `original_ms`."""
        return self.value * original_ms if self.relative else float(self.value)

    def lut_ms(self, estimated_ms: float, measured_ms: float | None = None) -> float:
        """The budget in the LUT's terms, for an original model estimated at `estimated_ms`.

        A relative budget is a ratio, so in the LUT's terms it is that fraction of the
        original's estimate, whatever the device measured. An absolute one is scaled by the
        original's estimate over its measurement: a multiplicative calibration, which one
        disturbed measurement moves by its own error, where an additive offset (measured −
        estimated) moved a 60% budget to 28% of the estimate.
        """
        if self.relative or measured_ms is None:
            return self.ms(estimated_ms)
        return self.value * estimated_ms / measured_ms

    def fraction(self, measured_original_ms: float | None) -> float | None:
        """The budget as a fraction of the original's measured latency (None: not known)."""
        if self.relative:
            return self.value
        return None if measured_original_ms is None else self.value / measured_original_ms

    def __str__(self) -> str:
        return f"{self.value:g} of the original" if self.relative else f"{self.value:g} ms"



def model_specs(estimator: Estimator, model: Any, out_channels: Mapping[str, int] | None = None) -> list[LayerSpec]:
    """The specs of `model` (pruned to `out_channels` per Conv2D/Dense) as deployed for the
    estimator's LUT: converted to its dtype (an int8 LUT counts the int8 model's ops)."""
    return specs_of_keras(model, out_channels, dtype=estimator.dtype)


def estimate_ms(estimator: Estimator, model: Any, out_channels: Mapping[str, int] | None = None) -> float:
    """The LUT estimate of `model` (pruned to `out_channels` per Conv2D/Dense), in ms."""
    try:
        return estimator.total_us(model_specs(estimator, model, out_channels)) / 1000
    except LutError as e:
        raise AdapterError(str(e)) from e


def ensure_estimable(
    estimator: Estimator,
    specs: Sequence[LayerSpec],
    device: Device | None = None,
    *,
    log: Callable[[str], None] = print,
    policy: MonitorPolicy | None = MonitorPolicy(),
) -> int:
    """Make every spec of `specs` estimable from `estimator`'s LUT, measuring what is missing.

    Specs the LUT can neither look up nor interpolate are measured on `device` in one
    batch (`profiler.build_lut.build_lut`, which keeps the LUT's per-invocation overhead, so
    estimates before and after stay comparable, under the conditions monitor's `policy`, None
    for none) and stored in the LUT; without a device, or
    if a measurement fails, raises `AdapterError`. Returns how many were measured.
    """
    missing = estimator.missing(specs)
    if not missing:
        return 0
    path = estimator.table.path
    if device is None:
        raise AdapterError(
            f"The LUT {path} cannot estimate {len(missing)} layer(s) the search needs (e.g. "
            f"{missing[0].key}) and no device is reachable to measure them. Build the LUT for this "
            "model (`python -m profiler.build_lut --model ... --resolution ...`) or make its device reachable."
        )
    log(f"measuring {len(missing)} layer(s) missing from {path} on {device.name}")
    build_lut(device, missing, estimator.table, retry_failed=True, progress=False, policy=policy)
    estimator.refresh()
    still = estimator.missing(specs)
    if still:
        result = estimator.table.lookup(still[0])
        reason = getattr(result, "error", "no result")
        raise AdapterError(
            f"{len(still)} layer(s) could not be measured on {device.name} for {path}, e.g. "
            f"{still[0].key}: {reason}."
        )
    return len(missing)


class GroupLatency:
    """The LUT estimate of the current model with one group's channel count changed.

    The specs of any count follow from the model's specs and their slopes in each group's
    count (`lut.keras_specs.channel_slopes`: one walk per group, one channel smaller),
    without walking the model again.
    """

    def __init__(
        self, model: Any, groups: Sequence[Any], estimator: Estimator,
        specs_of: Callable[[Any, Mapping[str, int]], list[LayerSpec]] | None = None,
    ) -> None:
        self.estimator, self.groups = estimator, {g.id: g for g in groups}
        shrunk = {g.id: {name: g.size - 1 for name in g.producers} for g in groups if g.size > 1}
        if specs_of is None:  # the model as deployed for the estimator's LUT
            specs_of = functools.partial(model_specs, estimator)
        self.base, self._slopes = channel_slopes(model, shrunk, specs_of)

    @property
    def total_ms(self) -> float:
        """The estimate of the current model."""
        return self.estimator.total_us(self.base) / 1000

    def specs_at(self, group_id: str, count: int) -> list[LayerSpec]:
        """The specs that change when the group has `count` channels, at that count."""
        return [spec for _, spec in self._changed(group_id, count)]

    def _changed(self, group_id: str, count: int) -> Iterator[tuple[int, LayerSpec]]:
        removed = self.groups[group_id].size - count
        for i, d_in, d_out in self._slopes.get(group_id, []):
            spec = self.base[i]
            yield i, spec.replace(cin=spec.cin - removed * d_in, cout=spec.cout - removed * d_out)

    def total_ms_at(self, group_id: str, count: int) -> float:
        """The estimate of the model with the group at `count` channels (as `estimator.total_us`
        computes it for the whole model)."""
        specs = list(self.base)
        for i, spec in self._changed(group_id, count):
            specs[i] = spec
        return self.estimator.total_us(specs) / 1000

    def candidates(self, group_id: str, step: int) -> list[int]:
        """Counts on the grid below the group's current size, largest first."""
        size = self.groups[group_id].size
        return [c for c in range((size - 1) // step * step, 0, -step)] if group_id in self._slopes else []


