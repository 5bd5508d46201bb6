"""Parse what TFLite's `benchmark_model` prints into a `BenchmarkResult`.

`parse_benchmark_output` is a pure function from the tool's text to an object, so saved
phone output can be tested without a phone.  `tests/data/benchmark_outputs/` holds real
outputs of many releases (TF 1.12 to the 2.15+ / LiteRT builds) with their sources.  It
understands:

* the statistics lines `count=N first=F curr=C min=A max=B avg=M std=S` (all releases),
  with ` p5=… median=… p95=…` appended by recent builds, and `count=N curr=C` (plus
  `(all same)` when N > 1) when every run took the same time, e.g. a single warm-up run.
  benchmark_model prints one for the warm-up phase and then one for the measured phase:
  the last one is the measurement.  The `Timings (microseconds): count=…` line of
  `--enable_op_profiling` is a sum over ops, not a run, and is ignored;
* the summary: `Inference timings in us: Init: …, First inference: …, Warmup (avg): …,
  Inference (avg): …` (TF 2.1 onwards), and the TF 1.x `Average inference timings in us:
  Warmup: …, Init: …, no stats: …` (1.12–1.15) or `…, Inference: …` (the form the 2.0-era
  README and Android benchmark app show).  An output whose summary stands without a
  statistics line (grepped or elided by whoever saved it) gives the summary's average with
  `count`, `min_us`, `max_us`, `std_us` None: those figures were not printed;
* what the GPU and the NNAPI delegates did, from one table of phrasings
  (`_DELEGATE_VERDICTS`), X being `GPU` or `NNAPI`:
  `Explicitly applied X delegate, and the model graph will be completely / partially
  executed by the delegate` (TF 2.4 onwards), the mid-2020 (TF 2.3) `Applied X delegate,
  and the model graph will be completely executed w/ the delegate`, `Though X delegate is
  explicitly applied, the model graph will not be executed by the delegate`, `Failed to
  apply X delegate.`, `X acceleration is unsupported on this platform.`, and TFLite's own
  `Replacing N out of M node(s) with delegate (TfLiteGpuDelegateV2 | TfLiteNnapiDelegate)
  node, yielding K partitions[ for the whole graph | for subgraph 0].`  The older
  `Replacing N node(s) with delegate (…) node, yielding K partitions.` names no total, so
  it only ever proves "none" (N = 0).  XNNPACK, Hexagon and external delegates print the
  same verdict lines with their own names; they are not GPU or NNAPI and are not reported.

Lines may carry log prefixes (`INFO: `, logcat's `I tflite  : `, glog's `… .cc:324] `) and
the indentation of the document they were pasted into.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import TypedDict

from profiler.errors import ProfilerError

__all__ = [
    "DELEGATE_STATES",
    "GPU_DELEGATE_STATES",
    "BenchmarkOutputError",
    "BenchmarkResult",
    "parse_benchmark_output",
]

DELEGATE_STATES = ("full", "partial", "none")
GPU_DELEGATE_STATES = DELEGATE_STATES

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
    r"Replacing (?P<replaced>\d+) (?:out of (?P<total>\d+) )?node\(s\) with delegate \((?P<delegate>[^)]*)\) node,"
    r" yielding (?P<partitions>\d+) partitions"
)


def _verdicts(name: str) -> tuple[tuple[re.Pattern[str], str], ...]:
    """(pattern, state) for the lines in which benchmark_model says what delegate `name` did."""
    applied = rf"(?:Explicitly a|A)pplied {name} delegate, and the model graph will be"
    return (
        (re.compile(rf"{applied} completely executed (?:by|w/) the delegate"), "full"),
        (re.compile(rf"{applied} partially executed (?:by|w/) the delegate"), "partial"),
        (re.compile(rf"Though {name} delegate is (?:explicitly )?applied, the model graph will not be executed"), "none"),
        (re.compile(rf"Failed to apply (?:the )?{name} delegate", re.IGNORECASE), "none"),
        (re.compile(rf"{name} acceleration is unsupported on this platform"), "none"),
    )


@dataclasses.dataclass(frozen=True)
class _Delegate:
    keyword: str  # every line that speaks of this delegate names it (lower case)
    verdicts: tuple[tuple[re.Pattern[str], str], ...]
    requested: re.Pattern[str]  # the run asked for it (but this says nothing of how much it took)


# Result field prefix -> how benchmark_model speaks of that delegate.
_DELEGATES = {
    "gpu": _Delegate(
        "gpu",
        _verdicts("GPU"),
        re.compile(
            r"Use gpu\s*: \[1\]|Created TensorFlow Lite delegate for GPU|GPU delegate created|Applied GPU delegate\.",
            re.IGNORECASE,
        ),
    ),
    "nnapi": _Delegate(
        "nnapi",
        _verdicts("NNAPI"),
        re.compile(r"Use nnapi\s*: \[1\]|Created TensorFlow Lite delegate for NNAPI|NNAPI delegate created", re.IGNORECASE),
    ),
}
_STARTED_MARKERS = ("STARTING!", "Loaded model", "Graph: [")
# Printing keeps 6 significant digits (`avg=1.24027e+06`), so the summary and the statistics
# line of one run agree to this relative tolerance.
_SUMMARY_TOLERANCE = 1e-3
_QUOTE_LINES = 6


class _Stats(TypedDict):
    """The figures of one statistics line, named as `BenchmarkResult`'s fields."""

    avg_us: float
    std_us: float | None
    min_us: float | None
    max_us: float | None
    count: int | None
    median_us: float | None


class BenchmarkOutputError(ProfilerError):
    """`benchmark_model` output that does not contain a complete, consistent measurement."""


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """One benchmark_model run, in microseconds.

    `avg_us … count` describe the measured (last) phase.  `std_us`, `min_us`, `max_us` and
    `count` are None only when the output holds the summary line without the statistics
    line (someone grepped or elided it): the average is known, the spread is not.
    `init_us`, `first_us`, `warmup_avg_us` come from the summary line and are None where
    the format has no such figure (the old format prints no first inference).
    `median_us` is None unless the build prints percentiles.  `gpu_delegate` and
    `nnapi_delegate` are "full", "partial" or "none" when the output speaks of that
    delegate (a run that asked for it but never says it took the graph is "none"), None
    when it does not; `gpu_delegate_line` / `nnapi_delegate_line` is the line that decided.
    """

    avg_us: float
    std_us: float | None
    min_us: float | None
    max_us: float | None
    count: int | None
    init_us: float | None = None
    first_us: float | None = None
    warmup_avg_us: float | None = None
    median_us: float | None = None
    gpu_delegate: str | None = None
    gpu_delegate_line: str | None = None
    nnapi_delegate: str | None = None
    nnapi_delegate_line: str | None = None

    @property
    def has_statistics(self) -> bool:
        """Whether the statistics line was printed (count, min, max, std known)."""
        return self.count is not None


def parse_benchmark_output(text: str) -> BenchmarkResult:
    """The measured run described by `text`, the output of one `benchmark_model` call.

    Raises `BenchmarkOutputError`, quoting the offending lines, when `text` has no
    summary line (the output was cut short, or the run failed), numbers that are not
    finite, or a summary that disagrees with the statistics.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str. Received: {type(text).__name__}.")
    lines = [line.rstrip("\r") for line in text.splitlines()]
    if not any(line.strip() for line in lines):
        raise BenchmarkOutputError("benchmark_model printed nothing; expected its timing lines. Received: ''.")
    stats = _last_stats(lines)
    summary = _last_summary(lines)
    if stats is None and summary is None:
        if any(marker in line for line in lines for marker in _STARTED_MARKERS):
            raise BenchmarkOutputError(
                "benchmark_model started but stopped before timing any run (the run failed); no "
                f"`count=… avg=…` line and no `Inference timings in us:` summary. Received: {_quote(_telling_lines(lines))}."
            )
        raise BenchmarkOutputError(
            "benchmark_model output has neither a `count=… avg=…` line nor an `Inference timings in us:` "
            f"summary; it is not a benchmark_model run. Received: {_quote(_telling_lines(lines))}."
        )
    if summary is None:
        raise BenchmarkOutputError(
            "benchmark_model output stops before its `Inference timings in us:` summary (cut short, or the "
            f"run failed). Last lines received: {_quote(lines[-_QUOTE_LINES:])}."
        )
    summary_line, figures = summary
    if stats is None:
        # The summary repeats the measured average; only the spread is missing.
        values: _Stats = {
            "avg_us": figures["inference_avg_us"],
            "std_us": None,
            "min_us": None,
            "max_us": None,
            "count": None,
            "median_us": None,
        }
    else:
        stats_line, values = stats
        _check_consistent(stats_line, values, summary_line, figures)
    verdicts = {field: _delegate_state(lines, delegate) for field, delegate in _DELEGATES.items()}
    return BenchmarkResult(
        **values,
        init_us=figures.get("init_us"),
        first_us=figures.get("first_us"),
        warmup_avg_us=figures.get("warmup_avg_us"),
        gpu_delegate=verdicts["gpu"][0],
        gpu_delegate_line=verdicts["gpu"][1],
        nnapi_delegate=verdicts["nnapi"][0],
        nnapi_delegate_line=verdicts["nnapi"][1],
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
        _check_order(line, low, avg, high, std, count)
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


def _check_order(line: str, low: float, avg: float, high: float, std: float, count: float) -> None:
    if not (0 <= low <= avg * (1 + _SUMMARY_TOLERANCE) and avg <= high * (1 + _SUMMARY_TOLERANCE)):
        raise BenchmarkOutputError(
            f"benchmark_model statistics must satisfy 0 <= min <= avg <= max. Received: {_quote([line])}."
        )
    if std < 0 or count < 1:
        raise BenchmarkOutputError(
            f"benchmark_model statistics need count >= 1 and std >= 0. Received: {_quote([line])}."
        )


def _delegate_state(lines: list[str], delegate: _Delegate) -> tuple[str | None, str | None]:
    """What `delegate` did: the least delegated verdict found, with its line.

    Only positive evidence gives "full": a run that asked for the delegate and says
    nothing about how the graph was delegated is "none".
    """
    rank = {"none": 0, "partial": 1, "full": 2}
    verdict: tuple[str, str] | None = None
    requested: str | None = None
    for line in lines:
        if delegate.keyword not in line.lower():
            continue
        state = _line_verdict(line, delegate)
        # On a tie the later line wins: benchmark_model's own verdict follows TFLite's log.
        if state is not None and (verdict is None or rank[state] <= rank[verdict[0]]):
            verdict = (state, line.strip())
        if requested is None and delegate.requested.search(line):
            requested = line.strip()
    if verdict is not None:
        return verdict
    if requested is not None:
        return "none", requested
    return None, None


def _line_verdict(line: str, delegate: _Delegate) -> str | None:
    for pattern, state in delegate.verdicts:
        if pattern.search(line):
            return state
    replacing = _REPLACING_RE.search(line)
    if not replacing or delegate.keyword not in replacing.group("delegate").lower():
        return None
    replaced, partitions = int(replacing.group("replaced")), int(replacing.group("partitions"))
    if replaced == 0:
        return "none"
    if replacing.group("total") is None:  # the old form names no total: how much was taken is unknown
        return None
    return "full" if replaced == int(replacing.group("total")) and partitions == 1 else "partial"


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
