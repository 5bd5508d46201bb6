"""The conditions monitor: no measurement is trusted unless the device measured a fixed
reference model at its quiet value around it.

A reference model (`reference_model`) is measured when a measuring session starts, after
every chunk of entries, and at its end. A chunk is kept only if the references before it and
after it are within `tolerance_pct` of the quiet value and, on a device that can tell (the
host, from /proc), other processes did not use more than `busy_cores` cores meanwhile: a
competing process slows an op through the caches, memory bandwidth and sibling threads that
it shares, which the thread CPU clock cannot see. The host's chunks last about a quarter of a
second (a VM's speed moves within a second as its neighbours come and go); a phone's are its
batches. After a disturbed chunk the device is let settle: other processes are waited for (at
most `wait_s`, saying why), then the reference is looked at every `poll_s` until it is quiet
again (for up to wait_s × try / 6), and the chunk is measured again. When the reference does
not come back in `max_tries` such tries, the session stops with `DriftError`, and what was
kept before stays kept. The quiet value is the LUT's (`reference_us` in its metadata),
measured when the LUT was created; every kept entry stores the reference's value at the
time, so a LUT can be audited later. The quiet value is the median of a few looks while
nothing else ran; it comes down when the looks of the last half minute say the device is
faster (a neighbour left), not on short fast bursts: on an Intel Xeon VM with nothing else
running, 5% of looks (15% in some 20 s windows) came out 13% under the rest, and a quiet value
taken from three of them in a row kept a build waiting for the next burst.

The same monitor serves interleaved whole-model checks (`adapter`): `check()` measures
the reference once and says whether a verdict taken now can be trusted.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar

import numpy as np

from lut.cli import number, positive_int
from lut.table import Measurement, MeasurementFailure
from profiler.convert import keras_to_tflite
from profiler.devices import Device, LoadProbe, Result
from profiler.errors import ProfilerError

__all__ = [
    "REFERENCE_ID",
    "REFERENCE_NAME",
    "Check",
    "ConditionsMonitor",
    "DriftError",
    "HostLoad",
    "MonitorPolicy",
    "ResolvedPolicy",
    "add_monitor_arguments",
    "monitor_policy",
    "reference_model",
]

# The reference is one model of two parts, so that both kinds of contention show in it:
# a 3×3 convolution whose 147 KB of weights stay in the core's cache (compute, a sibling
# thread), and 24 fully-connected 256 → 256 branches on one input whose 6.3 MB of weights
# do not (the shared cache and memory bandwidth, which a competing process on another
# core takes). Its latency per device: docs/profiler-figures.md.
REFERENCE_ID = "reference"  # the reference's id in a chunk handed to the device
REFERENCE_NAME = "reference-v1: conv2d 8x8x64:64 k3x3 + 24 x fully_connected 256:256"
_REFERENCE_BRANCHES = 24
_START_REPEATS = 5
_CONFIRM = 3  # checks whose median may lower the quiet value: at least these, and all of the last _CONFIRM_S
_CONFIRM_S = 30.0
_MIN_WINDOW_S = 0.1
_KEPT_EVENTS = 50  # disturbed chunks listed in a LUT's metadata (the count covers all)
_DEFAULT_EVERY = 32  # entries per chunk of a device that does not say (`monitor_every`)
_BACKOFF_PARTS = 6  # waits of wait_s/6, 2·wait_s/6, 3·wait_s/6: wait_s in all over 4 tries
_FLIPS = 4  # a chunk is measured at most max_tries × this many times when the device is quiet before and not after it


class DriftError(ProfilerError):
    """The device stayed disturbed: its reference model kept measuring off its quiet value."""


@dataclasses.dataclass(frozen=True)
class MonitorPolicy:
    """When measurements are trusted, and what happens when they are not.

    A field left None takes the device's own setting (`monitor_defaults`: a phone's
    `drift_*` lines in devices.toml) or else `DEFAULTS`; `every` None takes the device's
    chunk (`monitor_every`: a phone's batch, a few seconds of host measuring). The
    conditions monitor resolves them when it opens (`for_device`).
    """

    tolerance_pct: float | None = None
    busy_cores: float | None = None
    every: int | None = None
    wait_s: float | None = None
    max_tries: int | None = None
    poll_s: float | None = None

    DEFAULTS: ClassVar[dict[str, float]] = {"tolerance_pct": 8.0, "busy_cores": 0.5, "wait_s": 30.0, "max_tries": 4,
                                            "poll_s": 1.0}

    def __post_init__(self) -> None:
        for name in ("tolerance_pct", "busy_cores", "wait_s", "poll_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ProfilerError(f"`{name}` must be a non-negative number. Received: {name}={value!r}.")
        for name in ("max_tries", "every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ProfilerError(f"`{name}` must be a positive integer. Received: {name}={value!r}.")

    def for_device(self, device: Device) -> ResolvedPolicy:
        """Every field set: this policy's, else the device's own setting, else `DEFAULTS`."""
        own = {**self.DEFAULTS, **getattr(device, "monitor_defaults", {})}
        value = {name: own[name] if getattr(self, name) is None else getattr(self, name) for name in self.DEFAULTS}
        return ResolvedPolicy(
            tolerance_pct=float(value["tolerance_pct"]), busy_cores=float(value["busy_cores"]),
            every=self.every if self.every is not None else int(getattr(device, "monitor_every", _DEFAULT_EVERY)),
            wait_s=float(value["wait_s"]), max_tries=int(value["max_tries"]), poll_s=float(value["poll_s"]),
        )


@dataclasses.dataclass(frozen=True)
class ResolvedPolicy:
    """A `MonitorPolicy` with every field decided for one device (`MonitorPolicy.for_device`)."""

    tolerance_pct: float
    busy_cores: float
    every: int
    wait_s: float
    max_tries: int
    poll_s: float


class HostLoad:
    """How much CPU other processes use on this machine, read from /proc.

    `others_cores()` is the CPU time every process but this one and those `own()` names (the
    host's measuring process), and the hypervisor as steal time, took since the last call, in
    cores; `runnable()` the tasks ready to run now.
    """

    def __init__(self, proc: str = "/proc", own: Callable[[], Iterable[int]] = tuple):
        self._proc, self._own = proc, own
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._last = self._read()

    def _read(self) -> tuple[float, float, float]:
        with open(f"{self._proc}/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        busy = sum(fields[:3]) + sum(fields[5:8])
        # utime, stime of every thread of this process and of those it names as its own
        mine = sum(sum(_cpu_ticks(f"{self._proc}/{pid}/stat")) for pid in ("self", *self._own()))
        return time.monotonic(), busy / self._ticks, mine / self._ticks

    def others_cores(self) -> float:
        now = self._read()
        if now[0] - self._last[0] < _MIN_WINDOW_S:  # clock ticks are 10 ms: a shorter window says nothing
            time.sleep(_MIN_WINDOW_S - (now[0] - self._last[0]))
            now = self._read()
        (t0, busy0, mine0), (t1, busy1, mine1) = self._last, now
        self._last = now
        return max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (t1 - t0)

    def runnable(self) -> int:
        """Tasks running or ready to run, this process's measuring thread included."""
        with open(f"{self._proc}/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])


def _cpu_ticks(stat: str) -> list[int]:
    """utime and stime in a /proc stat file (none if the process is gone)."""
    try:
        with open(stat) as f:
            values = f.read().rsplit(")", 1)[1].split()
    except OSError:  # the process ended between listing and reading
        return []
    return [int(v) for v in values[11:13]]


@functools.lru_cache(maxsize=1)
def reference_model() -> bytes:
    """The reference model's `.tflite` (see `REFERENCE_NAME`), the same bytes on every device."""
    import keras  # TensorFlow takes seconds to import: only a monitor that opens pays for it

    keras.utils.set_random_seed(0)
    image, vector = keras.Input((8, 8, 64), batch_size=1), keras.Input((256,), batch_size=1)
    conv = keras.layers.Conv2D(64, 3, padding="same", activation="relu6")(image)
    branches = [keras.layers.Dense(256)(vector) for _ in range(_REFERENCE_BRANCHES)]
    model = keras.Model([image, vector], [conv, *branches])
    model.set_weights([np.random.default_rng(i).normal(0, 0.1, w.shape).astype("float32")
                       for i, w in enumerate(model.get_weights())])
    return keras_to_tflite(model)


@dataclasses.dataclass(frozen=True)
class Check:
    """One look at the conditions: the reference's latency now and what else ran."""

    reference_us: float | None
    quiet_us: float
    others_cores: float | None

    @property
    def drift_pct(self) -> float | None:
        return None if self.reference_us is None else 100 * (self.reference_us / self.quiet_us - 1)

    def describe(self) -> str:
        parts = ["reference failed" if self.reference_us is None else
                 f"reference {self.reference_us:.1f} µs ({self.drift_pct:+.1f}% of its quiet {self.quiet_us:.1f} µs)"]
        if self.others_cores is not None:
            parts.append(f"other processes used {self.others_cores:.1f} cores")
        return ", ".join(parts)


class ConditionsMonitor:
    """Measures through `device`, keeping only chunks taken while the device was quiet.

    Args:
        device: what measures, the reference model and the chunks alike.
        policy: when measurements are trusted; what it leaves unset the device decides
            (`MonitorPolicy.for_device`).
        quiet_us: the reference's quiet value (a LUT's `reference_us`); None measures it now.
        load: a `LoadProbe` (the host's `HostLoad`) that adds the busy check, or None where
            the device cannot tell.
        log: where to say what the monitor does (waiting, measuring again); None: nowhere.
        sleep: how to pause (tests pass a recorder).
        clock: what time it is, in seconds (tests pass a scripted one).
        reference: `reference_model()`'s bytes, made elsewhere (a phone farm's actor needs no
            TensorFlow); None makes them here.
    """

    def __init__(self, device: Device, policy: MonitorPolicy = MonitorPolicy(), *, quiet_us: float | None = None,
                 load: LoadProbe | None = None, log: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, reference: bytes | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.device, self.policy, self.load = device, policy.for_device(device), load
        self._log = log or (lambda message: None)
        self._sleep, self._clock = sleep, clock
        self._model = reference if reference is not None else reference_model()
        self.events: list[dict[str, object]] = []
        self.checks: list[Check] = []
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (when, reference_us)
        self._chunk_s: float | None = getattr(device, "monitor_chunk_s", None)
        self._item_s: float | None = None  # what one entry took in the last chunk, the reference's included
        self._quiet_now = quiet_us is None  # a new quiet value is measured quiet; a stored one is looked at first
        self.quiet_us = quiet_us if quiet_us is not None else self._measure_quiet()

    # ------------------------------------------------------------ looking
    def _reference_us(self) -> float | None:
        [(_, result)] = list(self.device.measure([(REFERENCE_ID, self._model)]))
        return result.median_us if isinstance(result, Measurement) else None

    def _measure_quiet(self) -> float:
        """The quiet value of a new LUT: after waiting for a quiet machine, the median of a few
        measurements (one run in a few comes out fast: 246 µs among 268–283 on this project's
        AMD VM, 265–270 among 300–320 on its Intel VM, which as the quiet value made every
        later check "disturbed")."""
        waited = self.wait_quiet()
        if self.load is not None and (others := self.load.others_cores()) > self.policy.busy_cores:
            raise DriftError(
                f"{self.device.name} stayed busy: other processes used {others:.1f} cores after {waited:.0f} s of "
                f"waiting (at most {self.policy.busy_cores:g}), so the reference's quiet value cannot be measured now; "
                "nothing was kept. Stop what else runs, or raise --wait-quiet, and run the same command again."
            )
        values = [v for v in (self._reference_us() for _ in range(_START_REPEATS)) if v is not None]
        if not values:
            raise ProfilerError(f"{self.device.name} could not run the reference model ({REFERENCE_NAME}).")
        return statistics.median(values)

    def _others(self) -> float | None:
        return None if self.load is None else self.load.others_cores()

    def wait_quiet(self) -> float:
        """Wait (at most `wait_s`) until other processes leave the device alone; seconds waited."""
        if self.load is None:
            return 0.0
        start = time.monotonic()
        self.load.others_cores()
        self._sleep(min(self.policy.poll_s, self.policy.wait_s))
        told = False
        while (others := self.load.others_cores()) > self.policy.busy_cores:
            if time.monotonic() - start >= self.policy.wait_s:
                break
            if not told:
                told = True
                self._log(f"{self.device.name} is busy: other processes use {others:.1f} cores "
                          f"({self.load.runnable()} tasks runnable); waiting up to {self.policy.wait_s:.0f} s")
            self._sleep(self.policy.poll_s)
        return time.monotonic() - start

    def check(self) -> Check:
        """Measure the reference now; `ok(check)` says whether the conditions hold."""
        return self._look(self._reference_us())

    def _look(self, reference_us: float | None) -> Check:
        """One look at the conditions, with the reference just measured: recorded, and the
        start of the next chunk's window."""
        check = Check(reference_us, self.quiet_us, self._others())
        self.checks.append(check)
        self._lower_quiet(check)
        self._quiet_now = self.ok(check)
        return check

    def _lower_quiet(self, check: Check) -> None:
        """References faster than the quiet value: it was itself disturbed (or the device got
        faster), and disturbance only slows the reference, so the quiet value comes down to them
        — once the median of the checks of the last `_CONFIRM_S` seconds (at least the last
        `_CONFIRM`) says so, not on a short fast burst."""
        if check.reference_us is None:
            return
        now = self._clock()
        self._recent.append((now, check.reference_us))
        while len(self._recent) > _CONFIRM and self._recent[0][0] < now - _CONFIRM_S:
            self._recent.popleft()
        confirmed = statistics.median(reference for _, reference in self._recent)
        if len(self._recent) >= _CONFIRM and confirmed < self.quiet_us:
            if confirmed < self.quiet_us * (1 - self.policy.tolerance_pct / 100):
                self._log(f"{self.device.name}'s reference measures {confirmed:.1f} µs, faster than its quiet "
                          f"value {self.quiet_us:.1f} µs: taking it as the quiet value")
            self.quiet_us = confirmed

    def ok(self, check: Check) -> bool:
        drift = check.drift_pct
        busy = check.others_cores is not None and check.others_cores > self.policy.busy_cores
        return drift is not None and drift <= self.policy.tolerance_pct and not busy

    # ------------------------------------------------------------ measuring
    def measure(self, models: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, Measurement | MeasurementFailure, float | None]]:
        """Yield `(model_id, result, reference_us)` for every model, chunk by chunk, each chunk
        kept only when the reference before it and the one after it say the device was quiet
        (on Ctrl-C, what the device finished of the chunk comes with reference None, then the
        interrupt goes on).

        A device with `monitor_chunk_s` (the host) gets chunks of about that many seconds, at
        most `every` entries: a VM whose neighbours come and go changes speed by 15–25% within
        a second (docs/profiler-figures.md), so a chunk must be short for the two looks around
        it to speak for it. Other devices (a phone's batch) get `every` entries a chunk."""
        chunk: list[tuple[str, bytes]] = []
        size = 1 if self._chunk_s else self.policy.every
        for item in models:
            chunk.append(item)
            if len(chunk) >= size:
                yield from self._measure_chunk(chunk)
                size, chunk = self._next_size(), []
        if chunk:
            yield from self._measure_chunk(chunk)

    def _next_size(self) -> int:
        if not self._chunk_s or not self._item_s:
            return self.policy.every
        return max(1, min(self.policy.every, int(self._chunk_s / self._item_s)))

    def _measure_chunk(self, chunk: Sequence[tuple[str, bytes]]) -> Iterator[tuple[str, Result, float | None]]:
        started = time.monotonic()
        unsettled = measured = 0
        while True:
            if not self._quiet_now and not self._settle(unsettled + 1):
                unsettled += 1
                if unsettled >= self.policy.max_tries:
                    check = self.checks[-1]
                    raise DriftError(
                        f"{self.device.name} stayed disturbed: {check.describe()} after {unsettled} tries in "
                        f"{time.monotonic() - started:.0f} s (tolerance +{self.policy.tolerance_pct:g}%, "
                        f"{self.policy.busy_cores:g} busy cores). Nothing measured under these conditions was kept; "
                        "what was measured before is. Stop what else runs (or let the phone cool down) and run the "
                        "same command again."
                    )
                continue
            self._others()  # start the busy window with the chunk
            results: list[tuple[str, Result]] = []
            begun = time.monotonic()
            try:
                results.extend(self.device.measure([*chunk, (REFERENCE_ID, self._model)]))
            except KeyboardInterrupt:
                # what the device finished is kept (nothing measured is lost), unchecked: no
                # reference came after it, so it is stored with none
                for model_id, result in results:
                    if model_id != REFERENCE_ID:
                        yield model_id, result, None
                raise
            self._item_s = (time.monotonic() - begun) / len(results)
            _, reference = results.pop()
            check = self._look(reference.median_us if isinstance(reference, Measurement) else None)
            if self._quiet_now:
                for model_id, result in results:
                    yield model_id, result, check.reference_us
                return
            measured += 1
            vitals = self.device.vitals() if hasattr(self.device, "vitals") else {}  # a phone's battery temperature
            self.events.append({"entries": len(chunk), "attempt": measured, "reference_us": check.reference_us,
                                "drift_pct": None if check.drift_pct is None else round(check.drift_pct, 2),
                                "others_cores": None if check.others_cores is None else round(check.others_cores, 2),
                                **vitals})
            if measured >= self.policy.max_tries * _FLIPS:
                raise DriftError(
                    f"{self.device.name} never stayed quiet through a chunk of {_entries(len(chunk))}: measured "
                    f"{measured} times in {time.monotonic() - started:.0f} s, each time quiet before it and disturbed "
                    f"after it (last: {check.describe()}). Nothing measured under these conditions was kept; what was "
                    "measured before is. Measure with fewer entries a chunk (the device's batch) or on a steadier "
                    "device, and run the same command again."
                )
            told = ", ".join(f"{k} {v}" for k, v in vitals.items())
            self._log(f"{self.device.name} was disturbed ({check.describe()}{'; ' + told if told else ''}); "
                      f"measuring {_entries(len(chunk))} again")

    def _settle(self, attempt: int) -> bool:
        """Wait until the reference measures quiet again: first for other processes to leave the
        device alone (`wait_quiet`), then looking at the reference every `poll_s` for up to
        wait_s × attempt / 6 (a phone's heat and a VM's neighbours show no cause, only a slow
        reference). Whether it came back."""
        self.wait_quiet()
        budget, slept, told = min(self.policy.wait_s * attempt / _BACKOFF_PARTS, self.policy.wait_s), 0.0, False
        while True:
            check = self.check()
            if self._quiet_now:
                return True
            if slept >= budget:
                return False
            if not told:
                told = True
                self._log(f"{self.device.name} is slow ({check.describe()}): looking again every "
                          f"{self.policy.poll_s:g} s for up to {budget:.0f} s")
            step = min(self.policy.poll_s, budget - slept)
            self._sleep(step)
            slept += step

    def summary(self) -> dict[str, object]:
        """What the monitor saw, for the LUT's metadata and reports."""
        drifts = [c.drift_pct for c in self.checks if c.drift_pct is not None]
        others = [c.others_cores for c in self.checks if c.others_cores is not None]
        return {
            "quiet_us": self.quiet_us, "checks": len(self.checks), "disturbed": len(self.events),
            "max_abs_drift_pct": round(max(map(abs, drifts)), 2) if drifts else None,
            "median_drift_pct": round(statistics.median(drifts), 2) if drifts else None,
            "max_others_cores": round(max(others), 2) if others else None,
            "tolerance_pct": self.policy.tolerance_pct, "busy_cores": self.policy.busy_cores,
            "events": self.events[-_KEPT_EVENTS:],
        }


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    """The conditions monitor's command-line options (every measuring command has them)."""
    non_negative_float = number(float, 0, open_low=False)

    d = MonitorPolicy.DEFAULTS
    phone = "; a phone's devices.toml may set its own"
    group = parser.add_argument_group("measuring conditions (the reference model and other processes)")
    group.add_argument("--tolerance", type=non_negative_float, metavar="PCT",
                       help=f"largest drift of the reference model from its quiet value that is still trusted "
                            f"(default: {d['tolerance_pct']:g}{phone}, drift_pct)")
    group.add_argument("--busy-cores", type=non_negative_float, metavar="N",
                       help=f"other processes using more CPU than this make the host busy (default: {d['busy_cores']:g})")
    group.add_argument("--wait-quiet", type=non_negative_float, metavar="S",
                       help=f"how long to wait for quiet before measuring a disturbed chunk again "
                            f"(default: {d['wait_s']:g}{phone}, drift_pause_s)")
    group.add_argument("--tries", type=positive_int,
                       help=f"measurements of a chunk before giving up on a disturbed device "
                            f"(default: {d['max_tries']:g}{phone}, drift_max_pauses + 1)")
    group.add_argument("--no-monitor", action="store_true",
                       help="trust every measurement (no reference model, no busy check): for debugging only")


def monitor_policy(args: argparse.Namespace) -> MonitorPolicy | None:
    """The policy `add_monitor_arguments`' options ask for (None with --no-monitor); what
    they leave unset the device decides when the monitor opens (`MonitorPolicy.for_device`)."""
    if args.no_monitor:
        return None
    return MonitorPolicy(tolerance_pct=args.tolerance, busy_cores=args.busy_cores, wait_s=args.wait_quiet,
                         max_tries=args.tries)
