"""Whole models measured interleaved (A B A B …), so a slowdown of the device hits them alike.

A relative budget is a ratio, and a ratio is what this measures: `rounds` rounds, each
measuring every model once, with the conditions monitor's reference checked before the
first and after the last; the ratio of two models is the ratio of their medians over the
rounds, and its spread (the ratio's range over the rounds, relative to it) says how far it
can be trusted. A machine-wide slowdown then mostly cancels; what does not (a competing
process slows a model whose weights stream from memory more than one whose weights stay in
the cache) shows as spread, and in the conditions the result carries.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping

from lut.table import Measurement
from profiler.devices import Device
from profiler.errors import ProfilerError
from profiler.monitor import Check, ConditionsMonitor

__all__ = ["Interleaved", "measure_interleaved"]


@dataclasses.dataclass(frozen=True)
class Interleaved:
    """Per-round medians (µs) of each model, and the monitor's looks before and after."""

    rounds_us: Mapping[str, tuple[float, ...]]
    before: Check | None
    after: Check | None

    def median_ms(self, name: str) -> float:
        return statistics.median(self.rounds_us[name]) / 1000

    def ratio(self, name: str, to: str) -> float:
        """median(name) / median(to)."""
        return statistics.median(self.rounds_us[name]) / statistics.median(self.rounds_us[to])

    def spread(self, name: str, to: str) -> float:
        """The range of the per-round ratios, relative to the ratio of medians."""
        ratios = [a / b for a, b in zip(self.rounds_us[name], self.rounds_us[to], strict=True)]
        return (max(ratios) - min(ratios)) / self.ratio(name, to)

    def conditions(self) -> dict[str, object]:
        """What the measurement was taken under, for reports."""
        def look(check: Check | None) -> dict[str, float | None] | None:
            if check is None:
                return None
            return {"reference_us": check.reference_us, "quiet_us": check.quiet_us,
                    "drift_pct": None if check.drift_pct is None else round(check.drift_pct, 2),
                    "others_cores": None if check.others_cores is None else round(check.others_cores, 2)}

        return {"rounds": len(next(iter(self.rounds_us.values()))), "before": look(self.before), "after": look(self.after)}


def measure_interleaved(device: Device, models: Mapping[str, bytes], *, rounds: int = 5,
                        monitor: ConditionsMonitor | None = None) -> Interleaved:
    """Measure each named `.tflite` once per round for `rounds` rounds on `device`."""
    if rounds < 1:
        raise ProfilerError(f"`rounds` must be a positive integer. Received: rounds={rounds!r}.")
    before = monitor.check() if monitor is not None else None
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, result in device.measure(list(models.items())):
            if not isinstance(result, Measurement):
                raise ProfilerError(f"{name} could not be measured on {device.name}: {result.error}")
            per_round[name].append(result.median_us)
    after = monitor.check() if monitor is not None else None
    return Interleaved({name: tuple(values) for name, values in per_round.items()}, before, after)
