"""Whole models measured interleaved (A B A B …), so a slowdown of the device hits them alike.

A relative budget is a ratio, and a ratio is what this measures: `rounds` rounds, each
measuring every model once, with the conditions monitor's reference checked before the
first and after the last; the ratio of two models is the median of their ratios over the
rounds, and its spread (the ratio's range over the rounds, relative to it) says how far it
can be trusted. A machine-wide slowdown then mostly cancels; what does not (a competing
process slows a model whose weights stream from memory more than one whose weights stay in
the cache) shows as spread, and in the conditions the result carries.

The ratio is the median of the rounds' ratios, each taken from two measurements a moment
apart, not the ratio of the two medians, which can come from rounds in different states of
the device: the Ice Lake VM switched between two speeds 1.8x apart with nothing else running
(the demo's original measured 260 µs in 7 rounds, then 217 and 145; its adapted model 153,
then 147 and 82: 58-59% in every round but the switching one), and the demo's final check
reported 78.9% for a model measured at 57.1% during the search and 58.8% after it.
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

    def __len__(self) -> int:
        """The rounds measured."""
        return len(next(iter(self.rounds_us.values()), ()))

    def then(self, more: Interleaved) -> Interleaved:
        """These rounds and `more`'s (the same models, measured after), as one measurement."""
        return Interleaved({name: values + more.rounds_us[name] for name, values in self.rounds_us.items()},
                           self.before, more.after)

    def median_ms(self, name: str) -> float:
        return statistics.median(self.rounds_us[name]) / 1000

    def _ratios(self, name: str, to: str) -> list[float]:
        return [a / b for a, b in zip(self.rounds_us[name], self.rounds_us[to], strict=True)]

    def ratio(self, name: str, to: str) -> float:
        """The median over the rounds of name / to."""
        return statistics.median(self._ratios(name, to))

    def spread(self, name: str, to: str) -> float:
        """The range of the per-round ratios, relative to their median."""
        ratios = self._ratios(name, to)
        return (max(ratios) - min(ratios)) / statistics.median(ratios)

    def quartile_spread(self, name: str, to: str) -> float:
        """The interquartile range of the per-round ratios, relative to their median: what can
        move the median (one odd round in five does not)."""
        ratios = self._ratios(name, to)
        if len(ratios) < 2:
            return 0.0
        low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
        return (high - low) / statistics.median(ratios)

    def conditions(self) -> dict[str, object]:
        """What the measurement was taken under, for reports."""
        def look(check: Check | None) -> dict[str, float | None] | None:
            if check is None:
                return None
            return {"reference_us": check.reference_us, "quiet_us": check.quiet_us,
                    "drift_pct": None if check.drift_pct is None else round(check.drift_pct, 2),
                    "others_cores": None if check.others_cores is None else round(check.others_cores, 2)}

        return {"rounds": len(self), "before": look(self.before), "after": look(self.after),
                "rounds_us": {name: [round(us, 2) for us in values] for name, values in self.rounds_us.items()}}


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
