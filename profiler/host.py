"""The built-in device: this machine's CPU, measured with the LiteRT interpreter."""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from lut.table import Measurement, MeasurementFailure
from profiler.errors import ProfilerError
from profiler.monitor import HostLoad

__all__ = ["HostDevice", "TimingPolicy", "load_interpreter", "open_host", "time_interpreter"]


@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    """How long to time one model: warm up, then timed samples until the median is stable.

    A sample times enough back-to-back invocations to span `sample_us` (one, for a model
    slower than that) and is their mean: reading a clock costs time too (the thread CPU
    clock is a system call, 0.3–1 µs here, varying with load), and an op of a few
    microseconds would otherwise carry that cost in its LUT entry, where a whole model
    pays it once. Samples go on until at least `min_runs` samples and `min_seconds` have
    passed; then until the median of the first and of the second half agree within
    `stable_pct` percent (or `resolution_us`, below which sub-microsecond ops cannot agree
    better), or `max_seconds` is spent.
    """

    warmup_runs: int = 3
    sample_us: float = 50.0
    min_runs: int = 15
    min_seconds: float = 0.02
    max_seconds: float = 0.5
    stable_pct: float = 1.0
    resolution_us: float = 0.1


def load_interpreter(model: bytes, threads: int):
    """A LiteRT interpreter for `model` (XNNPACK on, as in the LiteRT default), tensors allocated."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as e:
            raise ProfilerError(
                "Measuring on the host needs LiteRT: pip install ai-edge-litert (or tflite-runtime)."
            ) from e
    interpreter = Interpreter(model_content=model, num_threads=threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        shape, dtype = detail["shape"], detail["dtype"]
        if np.issubdtype(dtype, np.floating):
            data = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            data = rng.integers(info.min, info.max, size=shape, dtype=dtype)
        interpreter.set_tensor(detail["index"], data)
    return interpreter


def time_interpreter(interpreter, policy: TimingPolicy = TimingPolicy(), clock=time.perf_counter_ns) -> Measurement:
    """Time `interpreter.invoke()` under `policy` with `clock` (nanoseconds); deadlines are wall time."""
    invoke, wall = interpreter.invoke, time.perf_counter_ns
    warmup_start = clock()
    for _ in range(policy.warmup_runs):
        invoke()
    warmup_us = (clock() - warmup_start) / 1e3 / max(policy.warmup_runs, 1)
    repeats = range(max(1, min(1000, int(policy.sample_us / max(warmup_us, 1e-3)))))
    samples: list[float] = []
    start = wall()
    deadline_min = start + policy.min_seconds * 1e9
    deadline_max = start + policy.max_seconds * 1e9
    while True:
        t0 = clock()
        for _ in repeats:
            invoke()
        elapsed = clock() - t0
        if elapsed > 0:  # a thread CPU clock can read equal across a migration between cores
            samples.append(elapsed / 1e3 / len(repeats))
        if len(samples) >= policy.min_runs and (now := wall()) >= deadline_min:
            if now >= deadline_max or _stable(samples, policy):
                break
    return Measurement(
        median_us=float(statistics.median(samples)),
        mean_us=float(statistics.fmean(samples)),
        min_us=float(min(samples)),
        max_us=float(max(samples)),
        std_us=float(statistics.pstdev(samples)),
        count=len(samples),
    )


def _stable(samples: list[float], policy: TimingPolicy) -> bool:
    half = len(samples) // 2
    a, b = statistics.median(samples[:half]), statistics.median(samples[half:])
    return abs(a - b) <= max(policy.stable_pct / 100 * min(a, b), policy.resolution_us)


def _litert_version() -> str:
    from importlib import metadata

    for dist in ("ai-edge-litert", "tflite-runtime"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "none"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class HostDevice:
    """This machine's CPU through LiteRT's Python interpreter (XNNPACK delegate, as shipped).

    With one thread the op runs on the calling thread, so it is timed with that thread's
    CPU clock: what the invocation costs, without the time other processes take the core
    away (a shared 2-core machine otherwise doubles some wall-clock samples at random).
    With several threads the work spreads over a thread pool, and wall time is the latency.
    """

    monitor_every = 20  # entries between two looks at the conditions (about a second at 32 px)

    def __init__(self, name: str = "host", threads: int = 1, policy: TimingPolicy = TimingPolicy()):
        self.name, self.backend, self.threads, self.policy = name, "cpu", threads, policy
        self._clock, self._timer = (time.thread_time_ns, "thread-cpu") if threads == 1 else (time.perf_counter_ns, "wall")

    def conditions(self) -> dict[str, object]:
        return {"device": self.name, "backend": "cpu", "threads": self.threads, "delegate": "xnnpack", "flags": f"timer={self._timer},sample_us={self.policy.sample_us:g}"}

    def fingerprint(self) -> dict[str, object]:
        from importlib import metadata

        try:
            tf_version = metadata.version("tensorflow")
        except metadata.PackageNotFoundError:
            tf_version = "none"
        return {
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "os": platform.platform(),
            "python": platform.python_version(),
            "runtime": _litert_version(),
            "tensorflow": tf_version,
        }

    def measure(self, models: Sequence[tuple[str, bytes]]) -> Iterator[tuple[str, Measurement | MeasurementFailure]]:
        for model_id, model in models:
            try:
                interpreter = load_interpreter(model, self.threads)
            except (ValueError, RuntimeError) as e:
                yield model_id, MeasurementFailure(f"LiteRT could not load the model: {e}")
                continue
            yield model_id, time_interpreter(interpreter, self.policy, self._clock)

    def load_probe(self) -> HostLoad:
        """What the conditions monitor reads to see other processes on this machine."""
        return HostLoad()

    def close(self) -> None:
        pass


def open_host(name: str, config: Mapping[str, object], backend: str, threads: int | None) -> HostDevice:
    """The registry's factory of the `host` kind (`profiler.devices.open_device`)."""
    if backend != "cpu":
        raise ProfilerError(f"The host device measures the CPU only. Received: backend={backend!r}; use --backend cpu.")
    return HostDevice(name, threads or 1)
