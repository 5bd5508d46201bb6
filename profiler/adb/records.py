"""What the batch runner on the phone reports, read into results.

`android_bench/run_batch.sh` appends one framed record per model to the batch's
`records.txt` (benchmark_model's output and its exit status, since adb's shell service
returns none).  These are pure functions of that text, so saved phone output is tested
without a phone.
"""
from __future__ import annotations

import dataclasses
import re
from importlib import resources
from typing import TypeAlias

from lut.errors import LutError
from lut.table import Measurement, MeasurementFailure
from profiler.benchmark_output import BenchmarkOutputError, parse_benchmark_output

__all__ = ["Outcome", "RunnerRecord", "error_text", "parse_runner_records", "result_from_record", "runner_script"]

_RECORD_RE = re.compile(r"^PHONEFIT_(BEGIN|END) (\S+) (\S+)(?: (-?\d+))?$")
_TIMEOUT_STATUSES = (124, 137)  # timeout's own status; 137 = SIGKILL after the grace period
_ERROR_RE = re.compile(r"error|fail|abort|fault|signal|denied|not found", re.IGNORECASE)

# A model's result, and whether a failure is a fault of the run (a crash, a timeout, output
# that cannot be read) rather than a fact about the op (a GPU delegate that does not take it).
Outcome: TypeAlias = tuple[Measurement | MeasurementFailure, bool]


@dataclasses.dataclass(frozen=True)
class _Delegated:
    """A backend whose delegate must take the whole graph: where `BenchmarkResult` says what it
    did (`verdict` and `verdict`_line), and how a failure names it."""

    verdict: str  # "gpu_delegate" | "nnapi_delegate"
    name: str  # "GPU", "NNAPI"
    latency: str  # "a GPU latency"


# backend -> its delegate; a backend not listed (the CPU) runs whatever the graph has.
_DELEGATED = {
    "gpu": _Delegated("gpu_delegate", "GPU", "a GPU latency"),
    "nnapi": _Delegated("nnapi_delegate", "NNAPI", "an NNAPI latency"),
}


def runner_script() -> bytes:
    """The bytes of `android_bench/run_batch.sh`, the batch runner pushed to the phone."""
    return resources.files("android_bench").joinpath("run_batch.sh").read_bytes()


@dataclasses.dataclass(frozen=True)
class RunnerRecord:
    """One model's record in `records.txt`: benchmark_model's exit status and output."""

    status: int
    output: str


def parse_runner_records(text: str, tag: str) -> dict[str, RunnerRecord]:
    """The complete records of `records.txt` whose markers carry `tag`, by model file name.

    A record cut off by a dropped connection (BEGIN without END) is ignored; a model
    measured again after a reconnect keeps its last complete record.
    """
    records: dict[str, RunnerRecord] = {}
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        match = _RECORD_RE.match(line)
        if not match or match.group(2) != tag:
            if current is not None:
                lines.append(line)
            continue
        kind, name, status = match.group(1), match.group(3), match.group(4)
        if kind == "BEGIN" and status is None:
            current, lines = name, []
        elif kind == "END" and status is not None and name == current:
            # run_batch.sh writes a newline before END so END starts a line; drop it again.
            if lines and lines[-1] == "":
                lines.pop()
            records[name] = RunnerRecord(int(status), "\n".join(lines))
            current, lines = None, []
    return records


def result_from_record(record: RunnerRecord | None, backend: str, timeout_s: float) -> Outcome:
    """(Measurement or MeasurementFailure, whether the failure is a fault of the run).

    A GPU or NNAPI delegate that does not take the whole graph (verdict "partial", "none",
    or no word of it) fails the entry but is no fault: it says the op does not run there,
    not that the phone or the setup is broken.
    """
    if record is None:
        return MeasurementFailure("the batch runner left no complete record for this model"), True
    if record.status in _TIMEOUT_STATUSES:
        return MeasurementFailure(
            f"benchmark_model ran past the per-model timeout of {timeout_s:g} s and was killed "
            f"(exit status {record.status}); last output: {error_text(record.output)}"
        ), True
    if record.status != 0:
        signal = f", killed by signal {record.status - 128}" if record.status > 128 else ""
        return MeasurementFailure(
            f"benchmark_model exited with status {record.status}{signal}: {error_text(record.output)}"
        ), True
    try:
        result = parse_benchmark_output(record.output)
    except BenchmarkOutputError as e:
        return MeasurementFailure(f"benchmark_model output could not be read: {e}"), True
    delegated = _DELEGATED.get(backend)
    if delegated is not None and getattr(result, delegated.verdict) != "full":
        state = getattr(result, delegated.verdict) or "not mentioned"
        line = getattr(result, f"{delegated.verdict}_line")
        evidence = f": {line!r}" if line else ""
        return MeasurementFailure(
            f"the {delegated.name} delegate did not run the whole graph (delegation {state}{evidence}); "
            f"not recorded as {delegated.latency}"
        ), False
    if result.count is None or result.min_us is None or result.max_us is None or result.std_us is None:
        # Only the summary's average was printed: no spread, so nothing to store as a LUT entry.
        # A build that prints no statistics line does so for every model, hence a fault.
        return MeasurementFailure(
            "benchmark_model printed its summary but no `count=… min=… max=… avg=… std=…` statistics line; "
            "a LUT entry needs the measured runs' spread. Use a benchmark_model build that prints it."
        ), True
    try:
        return Measurement(
            median_us=result.median_us if result.median_us is not None else result.avg_us,
            mean_us=result.avg_us,
            min_us=result.min_us,
            max_us=result.max_us,
            std_us=result.std_us,
            count=result.count,
        ), False
    except LutError as e:
        return MeasurementFailure(f"benchmark_model timings are not a usable latency: {e}"), True


def error_text(output: str, lines: int = 5) -> str:
    """The lines of `output` that explain a failure: its errors, else its end."""
    text_lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in text_lines if _ERROR_RE.search(line)]
    chosen = (errors or text_lines)[-lines:]
    return " | ".join(chosen) if chosen else "(no output)"
