"""The built-in device: this machine's CPU, measured with the LiteRT interpreter."""
from __future__ import annotations

import os
import pickle
import platform
import subprocess
import sys
import weakref
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

from lut.litert import litert_version
from lut.table import Measurement, MeasurementFailure
from profiler.errors import ProfilerError
from profiler.monitor import HostLoad
from profiler.timing import TimingPolicy

__all__ = ["HostDevice", "open_host"]

# the folder that holds the `profiler` package, for the measuring process's imports
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _WorkerGone(Exception):
    """The measuring process ended (a model crashed LiteRT, or it was killed)."""


class _Worker:
    """One measuring process (`profiler.host_worker`): a model's bytes in, its result out."""

    def __init__(self, threads: int, policy: TimingPolicy):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "profiler.host_worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.close = weakref.finalize(self, _stop, self._proc)
        try:
            kind, value = self._ask((threads, policy))
        except _WorkerGone as e:
            self.close()
            raise ProfilerError(f"The host's measuring process (python -m profiler.host_worker) did not start: {e}. "
                                "Reinstall phonefit (make install) and run the same command again.") from None
        if kind == "error":
            self.close()
            raise ProfilerError(f"Measuring on the host needs LiteRT: pip install ai-edge-litert (or tflite-runtime). {value}")
        self.pid: int = value

    def _ask(self, request: object) -> Any:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            pickle.dump(request, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
            return pickle.load(self._proc.stdout)
        except (BrokenPipeError, EOFError):
            code = self._proc.wait()
            raise _WorkerGone(f"signal {-code}" if code < 0 else f"exit code {code}") from None

    def measure(self, model: bytes) -> Measurement | MeasurementFailure:
        result: Measurement | MeasurementFailure = self._ask(model)
        return result


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()  # end of stdin ends the process
        except BrokenPipeError:  # it ended already
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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

    Models are measured in a process of their own (`profiler.host_worker`: LiteRT only, started
    on the first measurement and again whenever it ended, stopped by `close()`), not in the
    process that converts them with TensorFlow. With one thread the op runs on the measuring
    thread, so it is timed with that thread's CPU clock: what the invocation costs, without the
    time other processes take the core away (a shared 2-core machine otherwise doubles some
    wall-clock samples at random). With several threads the work spreads over a thread pool,
    and wall time is the latency.
    """

    # The conditions monitor looks at the reference every quarter of a second of measuring (at
    # most 20 entries apart), and every 0.2 s while it waits: a VM's speed moves within a second
    # as its neighbours come and go (docs/profiler-figures.md).
    monitor_every = 20
    monitor_chunk_s = 0.25
    monitor_defaults = {"poll_s": 0.2}

    def __init__(self, name: str = "host", threads: int = 1, policy: TimingPolicy = TimingPolicy()):
        self.name, self.backend, self.threads, self.policy = name, "cpu", threads, policy
        self._timer = "thread-cpu" if threads == 1 else "wall"
        self._worker: _Worker | None = None

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
            yield model_id, self._measure(model)

    def _measure(self, model: bytes) -> Measurement | MeasurementFailure:
        """In the measuring process; once more in a new one if it ended: a model that ends it
        twice crashes LiteRT (a process killed from outside is not the model's failure)."""
        ended: list[str] = []
        while len(ended) < 2:
            self._worker = self._worker or _Worker(self.threads, self.policy)
            try:
                return self._worker.measure(model)
            except _WorkerGone as e:
                self.close()
                ended.append(str(e))
        return MeasurementFailure(f"LiteRT crashed on the model: its measuring process ended twice ({', '.join(ended)})")

    def load_probe(self) -> HostLoad:
        """What the conditions monitor reads to see other processes on this machine (its own
        measuring process is not another)."""
        return HostLoad(own=lambda: [self._worker.pid] if self._worker else [])

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


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
