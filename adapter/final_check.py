"""What the device says about a search's models: the original measured before the search
(and checked against the LUT), candidates measured as a fraction of it, and the verdict;
then the final check of any search method: its model exported, measured interleaved with
the original and scored (`final_figures`), and the budget's verdict as the report gives it
(`budget_fields`).

Every figure is taken interleaved with the original (`profiler.interleave`) under the
conditions monitor: the reference model is measured before and after, and a look that
finds the device disturbed (the reference off its quiet value, or, on the host, other
processes busy) is measured again after waiting for quiet; if it stays disturbed, no
verdict is taken, and the report says why. A relative budget's verdict is the median of the
rounds' ratios, adapted / original; an absolute budget's is the adapted model's median, taken
only under conditions matching the LUT's (its reference's quiet value). A verdict's rounds
whose ratios' interquartile range passes `SPREAD_LIMIT` of their median are followed by as
many more (`MAX_ROUNDS` in all): a device that changes speed within rounds (the Ice Lake VM
switched between speeds 1.8x apart) has then swayed enough of them to move the median. (Not
the search's own measurements: under a competing process most rounds spread that wide, and
taking more for each tripled a search's measuring time.)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from adapter.errors import AdapterError
from adapter.export import Deployment, tflite_accuracy
from adapter.latency import OVER_BUDGET_TOLERANCE, OVER_PRUNED, Budget, Estimator, estimate_ms
from adapter.train import evaluate, evaluate_split
from adapter.training.data import Dataset
from profiler.devices import Device
from profiler.interleave import Interleaved, measure_interleaved
from profiler.monitor import ConditionsMonitor

__all__ = [
    "LUT_TOLERANCE",
    "MAX_ROUNDS",
    "ROUNDS",
    "SPREAD_LIMIT",
    "ModelChecker",
    "SearchOutcome",
    "Verdict",
    "budget_fields",
    "budget_verdict",
    "final_figures",
]

LUT_TOLERANCE = 0.15  # the LUT's estimate of the original and its measurement agree this well
ROUNDS = 5
SPREAD_LIMIT = 0.10  # a verdict's rounds whose ratios to the original have a wider interquartile range are followed by more
MAX_ROUNDS = 2 * ROUNDS


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The budget's verdict on the adapted model, with what it was taken under."""

    status: str  # "met", "over budget", "over-pruned" (met, but far under), "not taken"
    requested_fraction: float | None
    measured_fraction: float | None
    spread: float | None
    reason: str
    conditions: Mapping

    @property
    def met(self) -> bool | None:
        return None if self.status == "not taken" else self.status in ("met", "over-pruned")


class ModelChecker:
    """Measures models against the original on the final-check device, under the monitor.

    `device` measures whole models; `monitor` (a `profiler.monitor.ConditionsMonitor` on the
    LUT's device, with the LUT's quiet reference value) checks the conditions.
    """

    def __init__(self, device: Device, monitor: ConditionsMonitor | None, original_tflite: bytes, out_dir: str | Path,
                 *, rounds: int = ROUNDS, lut_tolerance: float = LUT_TOLERANCE, deployment: Deployment = Deployment()):
        self.device, self.monitor, self.rounds, self.lut_tolerance = device, monitor, rounds, lut_tolerance
        self.deployment = deployment  # how a candidate is converted: as the original was
        self.original, self.out = original_tflite, Path(out_dir)
        self.last: Interleaved | None = None  # the latest interleaved measurement

    def _measure(self, models: Mapping[str, bytes], tries: int | None = None) -> Interleaved | None:
        """`self.rounds` interleaved rounds taken while the device was quiet before and after, or
        None when it stayed disturbed for `tries` tries (the monitor's by default)."""
        monitor = self.monitor
        for attempt in range(tries or (monitor.policy.max_tries if monitor else 1)):
            if attempt and monitor is not None:
                monitor.wait_quiet()
            result = measure_interleaved(self.device, models, rounds=self.rounds, monitor=monitor)
            self.last = result
            if monitor is None:
                return result
            # with a monitor, the interleaved measurement has a look before and after it
            if result.before is not None and result.after is not None and monitor.ok(result.before) \
                    and monitor.ok(result.after):
                return result
        return None

    def original_ms(self, estimated_ms: float) -> float:
        """The original's latency, after checking that the LUT and the device agree on it."""
        result = self._measure({"original": self.original})
        if result is None:
            raise AdapterError(
                f"{self.device.name} stayed disturbed while measuring the original "
                f"({self.last.after.describe() if self.last and self.last.after else 'no reference'}); no budget can be "
                "trusted now. Stop what else runs (or let the phone cool down), or raise --wait-quiet, and run again."
            )
        measured = result.median_ms("original")
        error = estimated_ms / measured - 1
        if abs(error) > self.lut_tolerance:
            raise AdapterError(
                f"The LUT estimates the original at {estimated_ms:.4g} ms but it measures {measured:.4g} ms on "
                f"{self.device.name} ({error:+.0%}; tolerance ±{self.lut_tolerance:.0%}, --lut-tolerance): the LUT was built "
                f"under other conditions (another machine, runtime or load), or the device is busy "
                f"({result.after.describe() if result.after else 'no monitor'}). Rebuild the LUT on this device with "
                "`python -m profiler.build_lut`, or wait for a quiet machine."
            )
        return measured

    def fraction(self, model, name: str = "search") -> float | None:
        """`model`'s latency as a fraction of the original's (None: the device stayed disturbed)."""
        self.out.mkdir(parents=True, exist_ok=True)
        tflite = self.deployment.export(model, self.out / f"{name}.tflite")
        result = self._measure({"original": self.original, name: tflite})
        return None if result is None else result.ratio(name, "original")

    def measure(self, models: Mapping[str, bytes]) -> Interleaved | None:
        """The final measurement: the original and `models`, interleaved (None if disturbed);
        followed by as many rounds again while the ratios to the original spread over
        `SPREAD_LIMIT` (and the device stays quiet), up to `MAX_ROUNDS`."""
        models = {"original": self.original, **models}
        result = self._measure(models)
        while result is not None and len(result) < MAX_ROUNDS and _unsettled(result):
            more = self._measure(models, tries=1)
            if more is None:
                break
            result = self.last = result.then(more)
        return result


def _unsettled(result: Interleaved) -> bool:
    """Whether a model's per-round ratios to the original spread widely enough to move their median."""
    return any(result.quartile_spread(name, "original") > SPREAD_LIMIT for name in result.rounds_us if name != "original")


def budget_verdict(budget, result, *, measured_original_ms: float | None, last=None,
                   over_budget: float, over_pruned: float) -> Verdict:
    """The verdict on "adapted" in `result` (an `Interleaved`, or None when the device stayed
    disturbed: `last` is then the disturbed measurement, for the reason)."""
    requested = budget.fraction(measured_original_ms)
    if result is None:
        look = last.after.describe() if last is not None and last.after is not None else "no measurement"
        return Verdict("not taken", requested, None, None, f"the device stayed disturbed ({look})",
                       last.conditions() if last is not None else {})
    fraction, spread = result.ratio("adapted", "original"), result.spread("adapted", "original")
    if not budget.relative:
        requested = budget.value / result.median_ms("original")
    if fraction > requested * (1 + over_budget):
        status, reason = "over budget", f"{fraction:.1%} of the original measured, {requested:.1%} asked (+{over_budget:.0%})"
    elif fraction < requested * (1 - over_pruned):
        status, reason = "over-pruned", (f"{fraction:.1%} of the original measured, far under the {requested:.1%} asked "
                                          f"(more than {over_pruned:.0%} under): the search pruned more than needed")
    else:
        status, reason = "met", f"{fraction:.1%} of the original measured, {requested:.1%} asked"
    return Verdict(status, requested, fraction, spread, reason, result.conditions())


# --------------------------------------------------------------------------- the final check of a search


class SearchOutcome(Protocol):
    """What the report needs of any search method's result (NetAdapt's `NetAdaptResult` is one)."""

    @property
    def budget_ms(self) -> float: ...  # the budget in the LUT's terms the search ended with

    @property
    def measured_original_ms(self) -> float | None: ...

    @property
    def recalibrations(self) -> Sequence[Mapping[str, Any]]: ...

    @property
    def handed_back(self) -> Mapping[str, Any] | None: ...  # an over-pruned result walked back


def _model_figures(model: Any, estimator: Estimator, data: Dataset, x_test: Any, y_test: Any,
                   tflite: bytes) -> dict[str, Any]:
    from adapter.pruning.surgery import channel_counts  # Keras: loads TensorFlow (the CLIs have loaded it by now)

    return {
        "channels": channel_counts(model),
        "parameters": int(model.count_params()),
        "estimated_ms": estimate_ms(estimator, model),
        "holdout_accuracy": evaluate_split(model, data.holdout),
        "test_accuracy": evaluate(model, x_test, y_test),
        "tflite_test_accuracy": tflite_accuracy(tflite, x_test, y_test),
    }


def final_figures(models: Mapping[str, Any], estimator: Estimator, data: Dataset, checker: ModelChecker | None,
                  out: Path, *, beside_of: str | None = None,
                  deployment: Deployment = Deployment()) -> tuple[dict[str, dict[str, Any]], Any]:
    """Export every model of `models` (the original among them) to `out`/NAME.tflite as deployed,
    measure them on the device interleaved with the original (no measurement without a
    `checker`) and score them; `beside_of` also exports that model in the other dtype
    (NAME_int8.tflite beside a float32 deployment, NAME_float32.tflite beside an int8 one),
    measured and scored beside it. Returns each model's figures and the interleaved
    measurement (None when none was taken)."""
    x_test, y_test = data.test.arrays()
    tflites = {name: deployment.export(model, out / f"{name}.tflite") for name, model in models.items()}
    other = "int8" if deployment.dtype == "float32" else "float32"
    if beside_of is not None:
        tflites[f"{beside_of}_{other}"] = deployment.export(models[beside_of], out / f"{beside_of}_{other}.tflite", other)
    measured = None
    if checker is not None:
        measured = checker.measure({name: tflite for name, tflite in tflites.items() if name != "original"})
    figures = {name: _model_figures(model, estimator, data, x_test, y_test, tflites[name])
               for name, model in models.items()}
    for name in figures:
        figures[name]["measured_ms"] = measured.median_ms(name) if measured else None
        figures[name]["dtype"] = deployment.dtype
    if beside_of is not None:
        figures[beside_of][other] = {
            "measured_ms": measured.median_ms(f"{beside_of}_{other}") if measured else None,
            "tflite_test_accuracy": tflite_accuracy(tflites[f"{beside_of}_{other}"], x_test, y_test),
        }
    return figures, measured


def budget_fields(budget: Budget, result: SearchOutcome, original: Mapping[str, Any], adapted: Mapping[str, Any],
                  measured: Any, checker: ModelChecker | None) -> dict[str, Any]:
    """The budget's part of the report: what was asked, the search's calibration, and the verdict."""
    fields = {
        "spec": str(budget), "relative": budget.relative, "estimated_ms": result.budget_ms,
        "measured_original_ms": result.measured_original_ms, "recalibrations": list(result.recalibrations),
        "handed_back": result.handed_back, "tolerance": OVER_BUDGET_TOLERANCE, "over_pruned_below": OVER_PRUNED,
        "estimated_fraction": adapted["estimated_ms"] / original["estimated_ms"],
        "met_by_estimate": adapted["estimated_ms"] <= result.budget_ms + 1e-9,
    }
    if checker is None:
        return {**fields, "status": "not measured", "met_measured": None, "requested_fraction": budget.fraction(None),
                "measured_fraction": None, "spread": None, "reason": "no device", "conditions": {}}
    verdict = budget_verdict(budget, measured, measured_original_ms=result.measured_original_ms, last=checker.last,
                             over_budget=OVER_BUDGET_TOLERANCE, over_pruned=OVER_PRUNED)
    return {**fields, "status": verdict.status, "met_measured": verdict.met,
            "requested_fraction": verdict.requested_fraction, "measured_fraction": verdict.measured_fraction,
            "spread": verdict.spread, "reason": verdict.reason, "conditions": dict(verdict.conditions)}
