"""Parse what TFLite's `benchmark_model` prints into a `BenchmarkResult`.

`parse_benchmark_output` is a pure function from the tool's text to an object, so saved
phone output can be tested without a phone.  It understands:

* the statistics lines `count=N first=F curr=C min=A max=B avg=M std=S [p5=… median=… p95=…]`
  (or `count=1 curr=C` when a phase ran once).  benchmark_model prints one for the warm-up
  phase and then one for the measured phase: the last one is the measurement.  The
  `Timings (microseconds): count=…` line of `--enable_op_profiling` is a sum over ops, not a
  run, and is ignored;
* the summary, new format `Inference timings in us: Init: …, First inference: …,
  Warmup (avg): …, Inference (avg): …` and old format `Average inference timings in us:
  Warmup: …, Init: …, no stats: …` (or `…, Inference: …`);
* whether the GPU delegate took the whole graph: `Explicitly applied GPU delegate, and the
  model graph will be completely / partially executed …`, `Though GPU delegate is explicitly
  applied, the model graph will not be executed …`, `Failed to apply GPU delegate.`,
  `GPU acceleration is unsupported on this platform.`, and TFLite's own
  `Replacing N out of M node(s) with delegate (TfLiteGpuDelegateV2) node, yielding K partitions`.

Lines may carry log prefixes (`INFO: `, logcat's `I tflite  : `, glog's `… .cc:324] `).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import TypedDict

from profiler.errors import ProfilerError

__all__ = ["GPU_DELEGATE_STATES", "BenchmarkOutputError", "BenchmarkResult", "parse_benchmark_output"]

GPU_DELEGATE_STATES = ("full", "partial", "none")

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf))"
_FULL_STATS_RE = re.compile(
    rf"(?<![\w=])count={_NUMBER} first={_NUMBER} curr={_NUMBER} min={_NUMBER} max={_NUMBER}"
    rf" avg={_NUMBER} std={_NUMBER}(?P<rest>.*)$"
)
_SHORT_STATS_RE = re.compile(rf"(?<![\w=])count={_NUMBER} curr={_NUMBER}(?P<rest>.*)$")
_MEDIAN_RE = re.compile(rf"\bmedian={_NUMBER}")
# Statistics lines that are not runs of the whole graph.
_NOT_A_RUN = ("Timings (microseconds):", "Memory (bytes):")
_SUMMARY_RE = re.compile(r"(?P<head>(?:Average inference|Inference) timings in us):\s*(?P<body>.*)$")
# Summary field name -> BenchmarkResult field; both formats, driven by this table.
_SUMMARY_FIELDS = {
    "Init": "init_us",
    "First inference": "first_us",
    "Warmup (avg)": "warmup_avg_us",
    "Warmup": "warmup_avg_us",
    "Inference (avg)": "inference_avg_us",
    "Inference": "inference_avg_us",
    "no stats": "inference_avg_us",
}
_REPLACING_RE = re.compile(
    r"Replacing (\d+) out of (\d+) node\(s\) with delegate \((?P<delegate>[^)]*)\) node, yielding (\d+) partitions"
)
# (pattern, state) for the lines in which benchmark_model says what the GPU delegate did.
_GPU_VERDICTS = (
    (re.compile(r"Explicitly applied GPU delegate, and the model graph will be completely executed"), "full"),
    (re.compile(r"Explicitly applied GPU delegate, and the model graph will be partially executed"), "partial"),
    (re.compile(r"Though GPU delegate is explicitly applied, the model graph will not be executed"), "none"),
    (re.compile(r"Failed to apply (?:the )?GPU delegate", re.IGNORECASE), "none"),
    (re.compile(r"GPU acceleration is unsupported on this platform"), "none"),
)
_GPU_REQUESTED_RE = re.compile(
    r"Use gpu\s*: \[1\]|Created TensorFlow Lite delegate for GPU|GPU delegate created", re.IGNORECASE
)
# Printing keeps 6 significant digits (`avg=1.24027e+06`), so the summary and the statistics
# line of one run agree to this relative tolerance.
_SUMMARY_TOLERANCE = 1e-3
_QUOTE_LINES = 6


class _Stats(TypedDict):
    """The figures of one statistics line, named as `BenchmarkResult`'s fields."""

    avg_us: float
    std_us: float
    min_us: float
    max_us: float
    count: int
    median_us: float | None


class BenchmarkOutputError(ProfilerError):
    """`benchmark_model` output that does not contain a complete, consistent measurement."""


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """One benchmark_model run, in microseconds.

    `avg_us … count` describe the measured (last) phase.  `init_us`, `first_us`,
    `warmup_avg_us` come from the summary line and are None where the format has no such
    figure (the old format prints no first inference).  `median_us` is None unless the build
    prints percentiles.  `gpu_delegate` is "full", "partial" or "none" when the output
    speaks of a GPU delegate, None for a CPU run; `gpu_delegate_line` is the line that
    decided it.
    """

    avg_us: float
    std_us: float
    min_us: float
    max_us: float
    count: int
    init_us: float | None = None
    first_us: float | None = None
    warmup_avg_us: float | None = None
    median_us: float | None = None
    gpu_delegate: str | None = None
    gpu_delegate_line: str | None = None


def parse_benchmark_output(text: str) -> BenchmarkResult:
    """The measured run described by `text`, the output of one `benchmark_model` call.

    Raises `BenchmarkOutputError`, quoting the offending lines, when `text` has no
    statistics line for the measured phase, no summary line (the output was cut short),
    numbers that are not finite, or a summary that disagrees with the statistics.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str. Received: {type(text).__name__}.")
    lines = [line.rstrip("\r") for line in text.splitlines()]
    if not any(line.strip() for line in lines):
        raise BenchmarkOutputError("benchmark_model printed nothing; expected its timing lines. Received: ''.")
    stats = _last_stats(lines)
    summary = _last_summary(lines)
    if stats is None and summary is None:
        raise BenchmarkOutputError(
            "benchmark_model output has neither a `count=… avg=…` line nor an `Inference timings in us:` "
            f"summary; it is not a benchmark_model run. Received: {_quote(_telling_lines(lines))}."
        )
    if stats is None:
        assert summary is not None  # the case of neither is above
        raise BenchmarkOutputError(
            "benchmark_model output has a summary but no `count=… avg=…` statistics line of the measured "
            f"runs. Received: {_quote([summary[0]])}."
        )
    if summary is None:
        raise BenchmarkOutputError(
            "benchmark_model output stops before its `Inference timings in us:` summary (cut short, or the "
            f"run failed). Last lines received: {_quote(lines[-_QUOTE_LINES:])}."
        )
    stats_line, values = stats
    summary_line, figures = summary
    _check_consistent(stats_line, values, summary_line, figures)
    gpu_delegate, gpu_line = _gpu_delegate(lines)
    return BenchmarkResult(
        **values,
        init_us=figures.get("init_us"),
        first_us=figures.get("first_us"),
        warmup_avg_us=figures.get("warmup_avg_us"),
        gpu_delegate=gpu_delegate,
        gpu_delegate_line=gpu_line,
    )


def _last_stats(lines: list[str]) -> tuple[str, _Stats] | None:
    """The last run-statistics line and its values (count, avg, std, min, max, median)."""
    for line in reversed(lines):
        if any(marker in line for marker in _NOT_A_RUN):
            continue
        full = _FULL_STATS_RE.search(line)
        if full:
            count, _first, _curr, low, high, avg, std = (_number(line, g) for g in full.groups()[:7])
            rest = full.group("rest")
        else:
            short = _SHORT_STATS_RE.search(line)
            if not short:
                continue
            count, curr = (_number(line, g) for g in short.groups()[:2])
            low = high = avg = curr
            std = 0.0
            rest = short.group("rest")
        median = _MEDIAN_RE.search(rest)
        values: _Stats = {
            "avg_us": avg,
            "std_us": std,
            "min_us": low,
            "max_us": high,
            "count": _count(line, count),
            "median_us": _number(line, median.group(1)) if median else None,
        }
        _check_order(line, values)
        return line, values
    return None


def _last_summary(lines: list[str]) -> tuple[str, dict[str, float]] | None:
    for line in reversed(lines):
        match = _SUMMARY_RE.search(line)
        if not match:
            continue
        figures: dict[str, float] = {}
        for part in match.group("body").split(","):
            name, sep, value = part.partition(":")
            field = _SUMMARY_FIELDS.get(name.strip())
            if sep and field and not value.strip():
                raise BenchmarkOutputError(
                    f"benchmark_model's summary line is cut short after {name.strip()!r}. Received: {_quote([line])}."
                )
            if sep and field:
                figures[field] = _number(line, value.strip())
        if "inference_avg_us" not in figures:
            raise BenchmarkOutputError(
                "benchmark_model's summary line has no inference average (`Inference (avg): …` or "
                f"`no stats: …`). Received: {_quote([line])}."
            )
        return line, figures
    return None


def _check_consistent(stats_line: str, values: _Stats, summary_line: str, figures: dict[str, float]) -> None:
    """The summary repeats the measured average: a mismatch means two runs' output got mixed."""
    avg, summary_avg = values["avg_us"], figures["inference_avg_us"]
    if abs(avg - summary_avg) > _SUMMARY_TOLERANCE * max(abs(avg), abs(summary_avg), 1.0):
        raise BenchmarkOutputError(
            f"benchmark_model's summary average ({summary_avg:g} us) disagrees with the last statistics "
            f"line ({avg:g} us); the output mixes runs. Received: {_quote([stats_line, summary_line])}."
        )


def _check_order(line: str, values: _Stats) -> None:
    low, avg, high = values["min_us"], values["avg_us"], values["max_us"]
    if not (0 <= low <= avg * (1 + _SUMMARY_TOLERANCE) and avg <= high * (1 + _SUMMARY_TOLERANCE)):
        raise BenchmarkOutputError(
            f"benchmark_model statistics must satisfy 0 <= min <= avg <= max. Received: {_quote([line])}."
        )
    if values["std_us"] < 0 or values["count"] < 1:
        raise BenchmarkOutputError(
            f"benchmark_model statistics need count >= 1 and std >= 0. Received: {_quote([line])}."
        )


def _gpu_delegate(lines: list[str]) -> tuple[str | None, str | None]:
    """What the GPU delegate did: the least delegated verdict found, with its line.

    Only positive evidence gives "full": a run that asked for the GPU and says nothing
    about how the graph was delegated is "none".
    """
    rank = {"none": 0, "partial": 1, "full": 2}
    verdict: tuple[str, str] | None = None
    requested: str | None = None
    for line in lines:
        if "gpu" not in line.lower():  # every line that speaks of the GPU delegate names it
            continue
        state = _line_verdict(line)
        # On a tie the later line wins: benchmark_model's own verdict follows TFLite's log.
        if state is not None and (verdict is None or rank[state] <= rank[verdict[0]]):
            verdict = (state, line.strip())
        if requested is None and _GPU_REQUESTED_RE.search(line):
            requested = line.strip()
    if verdict is not None:
        return verdict
    if requested is not None:
        return "none", requested
    return None, None


def _line_verdict(line: str) -> str | None:
    for pattern, state in _GPU_VERDICTS:
        if pattern.search(line):
            return state
    replacing = _REPLACING_RE.search(line)
    if replacing and "gpu" in replacing.group("delegate").lower():
        replaced, total, partitions = int(replacing.group(1)), int(replacing.group(2)), int(replacing.group(4))
        if replaced == 0:
            return "none"
        return "full" if replaced == total and partitions == 1 else "partial"
    return None


def _number(line: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BenchmarkOutputError(f"benchmark_model printed a number that is not finite ({text!r}). Received: {_quote([line])}.")
    return value


def _count(line: str, value: float) -> int:
    if value != int(value):
        raise BenchmarkOutputError(f"benchmark_model's `count=` must be a whole number. Received: {_quote([line])}.")
    return int(value)


def _telling_lines(lines: list[str]) -> list[str]:
    """The lines that best explain a failed run: its errors if any, else its beginning."""
    errors = [line for line in lines if "ERROR" in line or "error" in line or "Failed" in line]
    return (errors or [line for line in lines if line.strip()])[:_QUOTE_LINES]


def _quote(lines: list[str]) -> str:
    shown = [line if len(line) <= 200 else line[:197] + "..." for line in lines]
    return " | ".join(repr(line) for line in shown)
