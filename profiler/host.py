"""The built-in device: this machine's CPU, measured with the LiteRT interpreter."""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np

from lut.litert import LiteRTMissingError, interpreter_class, litert_version
from lut.table import Measurement, MeasurementFailure
from profiler.errors import ProfilerError
from profiler.monitor import HostLoad
from profiler.timing import TimingPolicy, time_interpreter

__all__ = ["HostDevice", "load_interpreter", "open_host"]


def load_interpreter(model: bytes, threads: int) -> Any:
    """A LiteRT interpreter for `model` (XNNPACK on, as in the LiteRT default), tensors allocated
    and inputs set to seeded random values."""
    try:
        interpreter = interpreter_class()(model_content=model, num_threads=threads)
    except LiteRTMissingError as e:
        raise ProfilerError(f"Measuring on the host needs LiteRT: pip install ai-edge-litert (or tflite-runtime). {e}") from e
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "none"


class HostDevice:
    """This machine's CPU through LiteRT's Python interpreter (XNNPACK delegate, as shipped).

    With one thread the op runs on the calling thread, so it is timed with that thread's
    CPU clock: what the invocation costs, without the time other processes take the core
    away (a shared 2-core machine otherwise doubles some wall-clock samples at random).
    With several threads the work spreads over a thread pool, and wall time is the latency.
    """

    # The conditions monitor looks at the reference every quarter of a second of measuring (at
    # most 20 entries apart), and every 0.2 s while it waits: a VM's speed moves within a second
    # as its neighbours come and go (docs/profiler-figures.md).
    monitor_every = 20
    monitor_chunk_s = 0.25
    monitor_defaults = {"poll_s": 0.2}

    def __init__(self, name: str = "host", threads: int = 1, policy: TimingPolicy = TimingPolicy()):
        self.name, self.backend, self.threads, self.policy = name, "cpu", threads, policy
        self._clock, self._timer = (time.thread_time_ns, "thread-cpu") if threads == 1 else (time.perf_counter_ns, "wall")

    def conditions(self) -> dict[str, object]:
        return {"device": self.name, "backend": "cpu", "threads": self.threads, "delegate": "xnnpack",
                "flags": f"timer={self._timer},sample_us={self.policy.sample_us:g}"}

    def fingerprint(self) -> dict[str, object]:
        return {
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "os": platform.platform(),
            "python": platform.python_version(),
            "runtime": litert_version(),
            "tensorflow": _version("tensorflow"),
        }

    def measure(self, models: Sequence[tuple[str, bytes]]) -> Iterator[tuple[str, Measurement | MeasurementFailure]]:
        for model_id, model in models:
            try:
                interpreter = load_interpreter(model, self.threads)
            except ProfilerError:
                raise
            except (ValueError, RuntimeError) as e:
                yield model_id, MeasurementFailure(f"LiteRT could not load the model: {e}")
                continue
            yield model_id, time_interpreter(interpreter, self.policy, self._clock)

    def load_probe(self) -> HostLoad:
        """What the conditions monitor reads to see other processes on this machine."""
        return HostLoad()

    def close(self) -> None:
        pass


def open_host(name: str, config: Mapping[str, object], backend: str, threads: int | None, *,
              timing: TimingPolicy | None = None) -> HostDevice:
    """The registry's factory of the `host` kind (`profiler.devices.open_device`).

    Args:
        name: the device's name ("host").
        config: its devices.toml entry (none for the host).
        backend: "cpu"; the host has no other.
        threads: LiteRT's threads (None: 1).
        timing: how each model is timed (None: `TimingPolicy()`).
    """
    if backend != "cpu":
        raise ProfilerError(f"The host device measures the CPU only. Received: backend={backend!r}; use --backend cpu.")
    return HostDevice(name, threads or 1, timing or TimingPolicy())
