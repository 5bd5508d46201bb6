"""A phone farm: the phones of a devices.toml group measure one LUT together.

    [groups.pixel7]
    devices = ["pixel7-a", "pixel7-b"]      # phones of one model; the first reachable one leads

`python -m profiler.build_lut --device pixel7` opens a `PhoneFarm`: each phone is driven by a
Ray actor (`PhoneActor`) on the host it is attached to (`ray_node` in its devices.toml table:
the Ray node's IP address; left out, any node that reaches it: on one machine, this one), and
the entries go out in batches, one conditions-monitor chunk each (a phone's batch, its reference
model last), to whichever phone is free. Every row names the phone that measured it.

Phones must agree. When the session starts every phone measures the reference model; the
group's value is the LUT's (a resumed LUT), else the value most phones agree with within the
tolerance (on a tie the fastest: heat and background work only slow a phone). A phone off it by
more than the tolerance is taken out, with a message, before it measures anything; during the
build each phone's own monitor judges its batches against the group's value, and a phone that
stays disturbed (`DriftError`), drops off (its connection does not come back) or whose actor
dies is taken out and its batch goes to the others: nothing it had not finished is lost, and
nothing is measured twice. What one phone must measure for the whole LUT (the invocation
overhead, the cache sweep) the lead phone measures: the farm is a `Device` whose `measure` is
the lead's.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from lut.table import Measurement, MeasurementFailure
from profiler.device_config import AdbSettings, load_device_configs
from profiler.errors import ProfilerError
from profiler.monitor import ConditionsMonitor, MonitorPolicy, reference_model

__all__ = ["PhoneActor", "PhoneFarm", "group_reference"]

Result = Measurement | MeasurementFailure
_AFFINITY = 0.001  # of a node's `node:IP` resource: enough to pin an actor there, too little to limit it


def group_reference(references: Mapping[str, float], tolerance_pct: float) -> tuple[float, list[str]]:
    """The group's reference value and the phones off it by more than `tolerance_pct`.

    The value is the phone's reference that most phones agree with (within the tolerance either
    way); among equals the fastest, since heat and background work only ever slow a phone. Two
    phones 20% apart: the faster one's, and the slower one is off."""
    def agree(value: float) -> list[str]:
        return [name for name, us in references.items() if abs(us / value - 1) * 100 <= tolerance_pct]

    value = min(references.values(), key=lambda v: (-len(agree(v)), v))
    return value, [name for name in references if name not in agree(value)]


class PhoneActor:
    """One phone of a farm, in a Ray actor on its host: an `AdbDevice` and its conditions monitor.

    Made with small arguments only (its settings, backend, threads, the monitor's policy and the
    reference model's bytes, so the actor needs no TensorFlow)."""

    def __init__(self, settings: AdbSettings, backend: str, threads: int | None, policy: MonitorPolicy | None,
                 reference: bytes):
        self._open = (settings, backend, threads)
        self._device: Any = None
        self._policy, self._reference = policy, reference
        self._monitor: ConditionsMonitor | None = None
        self._messages: list[str] = []

    def pid(self) -> int:
        return os.getpid()

    def facts(self) -> tuple[dict[str, object], dict[str, object]]:
        """Reach the phone (here, not in the constructor: so that why it cannot be reached comes
        back as the error itself); its conditions and fingerprint."""
        from profiler.adb.device import AdbDevice

        if self._device is None:
            self._device = AdbDevice(*self._open)
        return self._device.conditions(), self._device.fingerprint()

    def reference_us(self) -> float:
        """The reference model's quiet value on this phone, measured as a new LUT's is."""
        return ConditionsMonitor(self._device, self._policy or MonitorPolicy(), reference=self._reference).quiet_us

    def start(self, quiet_us: float | None) -> None:
        """Judge every batch from now on against the group's reference value (None: no monitor)."""
        if self._policy is not None and quiet_us is not None:
            self._monitor = ConditionsMonitor(self._device, self._policy, quiet_us=quiet_us, reference=self._reference,
                                              log=self._messages.append)

    def measure_batch(self, models: Sequence[tuple[str, bytes]]) -> tuple[list[tuple[str, Result, float | None]], list[str]]:
        """`models` measured as one monitored chunk, and what the monitor said meanwhile."""
        self._messages.clear()
        results: list[tuple[str, Result, float | None]]
        if self._monitor is None:
            results = [(model_id, result, None) for model_id, result in self._device.measure(models)]
        else:
            results = list(self._monitor.measure(models))
        return results, list(self._messages)

    def measure(self, models: Sequence[tuple[str, bytes]]) -> list[tuple[str, Result]]:
        """`models` measured plainly (the lead phone's part: `PhoneFarm.measure`)."""
        return list(self._device.measure(models))

    def monitor_summary(self) -> dict[str, object] | None:
        return None if self._monitor is None else self._monitor.summary()

    def close(self) -> None:
        if self._device is not None:
            self._device.close()


@dataclasses.dataclass
class _Phone:
    """The driver's record of one phone."""

    name: str
    settings: AdbSettings
    actor: Any = None
    conditions: dict[str, object] = dataclasses.field(default_factory=dict)
    fingerprint: dict[str, object] = dataclasses.field(default_factory=dict)
    reference_us: float | None = None
    entries: int = 0
    busy_s: float = 0.0
    out: str | None = None  # why it was taken out


class PhoneFarm:
    """The phones of a devices.toml group as one device. Needs Ray started
    (`profiler.cluster.open_cluster`); use it as a context manager, or `close()` it.

    Args:
        group: the group's name (the LUT's `device` condition).
        phones: its phones in order (`load_device_groups`).
        backend, threads: as for `open_device`; every phone must measure under the same conditions.
        devices_file: the devices.toml they come from.
        policy: the conditions monitor's (None: no monitor).
        log: where to say what happens to the phones.
        show_rates: also say each phone's entries per minute whenever a batch finishes.
    """

    def __init__(self, group: str, phones: Sequence[str], *, backend: str = "cpu", threads: int | None = None,
                 devices_file: str | None = None, policy: MonitorPolicy | None = MonitorPolicy(),
                 log: Callable[[str], None] = print, show_rates: bool = False):
        import ray

        self.name, self.backend, self._policy, self._log, self._show_rates = group, backend, policy, log, show_rates
        configs = load_device_configs(devices_file)
        self._phones = [_Phone(name, configs[name]["settings"]) for name in phones]  # type: ignore[arg-type]
        remote: Any = ray.remote(PhoneActor)
        reference = reference_model()
        for phone in self._phones:
            options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
            if phone.settings.ray_node:
                options["resources"] = {f"node:{phone.settings.ray_node}": _AFFINITY}
            phone.actor = remote.options(**options).remote(phone.settings, backend, threads, policy, reference)
        for phone, outcome in zip(self._phones, self._gather(self._phones, "facts"), strict=True):
            if isinstance(outcome, BaseException):
                self._take_out(phone, f"could not be opened: {_cause(outcome)}")
            else:
                phone.conditions, phone.fingerprint = outcome
        self._lead()  # at least one phone is in
        self._check_conditions()

    # ------------------------------------------------------------ the Device protocol
    def conditions(self) -> dict[str, object]:
        return {**self._lead().conditions, "device": self.name}

    def fingerprint(self) -> dict[str, object]:
        """The lead phone's fingerprint, and every phone's under `phones` (with its reference)."""
        lead = self._lead()
        return {**lead.fingerprint, "group": self.name, "phones": {
            p.name: {**p.fingerprint, "reference_us": p.reference_us, "entries": p.entries, "taken_out": p.out}
            for p in self._phones}}

    @property
    def monitor_every(self) -> int:
        """A batch: one monitor chunk of a phone (its batch, the reference model last)."""
        s = self._lead().settings
        return s.drift_every or max(1, s.batch_size - 1)

    @property
    def monitor_defaults(self) -> dict[str, float]:
        s = self._lead().settings
        return {"tolerance_pct": s.drift_pct, "wait_s": s.drift_pause_s, "max_tries": s.drift_max_pauses + 1}

    def measure(self, models: Sequence[tuple[str, bytes]]) -> Iterator[tuple[str, Result]]:
        """`models` measured on the lead phone (what one phone must measure for the whole LUT)."""
        import ray

        lead = self._lead()
        try:
            results = ray.get(lead.actor.measure.remote(list(models)))
        except ray.exceptions.RayError as e:
            raise ProfilerError(f"{lead.name}, the lead phone of {self.name!r}, failed: {_cause(e)}") from e
        yield from results

    def close(self) -> None:
        import ray

        self._gather([p for p in self._phones if p.actor is not None], "close")
        for phone in self._phones:
            if phone.actor is not None:
                ray.kill(phone.actor)
                phone.actor = None

    def __enter__(self) -> PhoneFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the farm
    @property
    def phones(self) -> list[str]:
        """The phones not taken out."""
        return [p.name for p in self._phones if p.out is None]

    def start(self, quiet_us: float | None) -> float | None:
        """Every phone's reference, the group's value (`quiet_us`, a resumed LUT's, else
        `group_reference`), and the phones off it taken out; the value, None without a monitor."""
        if self._policy is None:
            self._gather(self._in(), "start", None)
            return None
        phones = self._in()
        for phone, outcome in zip(phones, self._gather(phones, "reference_us"), strict=True):
            if isinstance(outcome, BaseException):
                self._take_out(phone, f"could not measure the reference model: {_cause(outcome)}")
            else:
                phone.reference_us = float(outcome)
        measured = {p.name: p.reference_us for p in self._in() if p.reference_us is not None}
        if not measured:
            self._lead()  # raises, naming why each phone is out
        tolerance = self._policy.for_device(self).tolerance_pct
        if quiet_us is None:
            quiet_us, _ = group_reference(measured, tolerance)
        for phone in self._in():
            assert phone.reference_us is not None
            drift = 100 * (phone.reference_us / quiet_us - 1)
            if abs(drift) > tolerance:
                self._take_out(phone, f"its reference model measures {phone.reference_us:.1f} µs, {drift:+.1f}% of the "
                                      f"group's {quiet_us:.1f} µs (tolerance {tolerance:g}%): it is not the others' "
                                      "match now (another model, hot, busy); its entries go to the others")
        self._lead()
        self._gather(self._in(), "start", quiet_us)
        return quiet_us

    def measure_shards(self, models: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, Result, float | None, str]]:
        """Yield `(model_id, result, reference_us, phone)` for every model, batch by batch as the
        phones finish them (not in order). A phone that fails is taken out and its batch goes
        to the others; when every phone is out, `ProfilerError`."""
        import ray

        items = iter(models)
        size = self.monitor_every
        queue: collections.deque[list[tuple[str, bytes]]] = collections.deque()
        pending: dict[Any, tuple[_Phone, list[tuple[str, bytes]], float]] = {}

        def next_batch() -> list[tuple[str, bytes]] | None:
            if queue:
                return queue.popleft()
            batch = list(itertools.islice(items, size))
            return batch or None

        try:
            while True:
                busy = {id(phone) for phone, _, _ in pending.values()}
                for phone in self._in():
                    if id(phone) in busy:
                        continue
                    batch = next_batch()
                    if batch is None:
                        break
                    pending[phone.actor.measure_batch.remote(batch)] = (phone, batch, time.monotonic())
                if not pending:
                    return
                [ready], _ = ray.wait(list(pending), num_returns=1)
                phone, batch, started = pending.pop(ready)
                try:
                    results, messages = ray.get(ready)
                except (ray.exceptions.RayError, ProfilerError) as e:
                    queue.appendleft(batch)
                    self._take_out(phone, f"{_cause(e)}; its batch of {len(batch)} entries goes to the others")
                    self._lead()
                    continue
                phone.busy_s += time.monotonic() - started
                phone.entries += len(results)
                for message in messages:
                    self._log(message)
                if self._show_rates:
                    self._log(f"{phone.name} finished {len(results)} entries; entries/min: "
                              + ", ".join(f"{name} {rate:.1f}" for name, rate in self.rates().items()))
                for model_id, result, reference_us in results:
                    yield model_id, result, reference_us, phone.name
        finally:
            # stopped early (Ctrl-C): a batch in flight is not waited for; its phone's actor goes
            # (the phone's next session clears what it left there) and a rerun measures it again
            for phone, _, _ in pending.values():
                if phone.actor is not None:
                    ray.kill(phone.actor)
                    phone.actor = None

    def rates(self) -> dict[str, float]:
        """Entries per minute of each phone still in, over the time it spent measuring."""
        return {p.name: 60 * p.entries / p.busy_s for p in self._in() if p.busy_s > 0}

    def monitor_summary(self) -> dict[str, object] | None:
        """The phones' monitors in one summary (`ConditionsMonitor.summary`'s keys), each phone's
        own under `phones`."""
        if self._policy is None:
            return None
        own = {p.name: s for p, s in zip(self._in(), self._gather(self._in(), "monitor_summary"), strict=True)
               if isinstance(s, dict)}
        drifts = [s["max_abs_drift_pct"] for s in own.values() if s.get("max_abs_drift_pct") is not None]
        first = next(iter(own.values()), {})  # the lead's
        return {
            "quiet_us": first.get("quiet_us"), "checks": sum(int(s["checks"]) for s in own.values()),
            "disturbed": sum(int(s["disturbed"]) for s in own.values()),
            "max_abs_drift_pct": max(drifts) if drifts else None, "max_others_cores": None,
            "tolerance_pct": first.get("tolerance_pct"), "phones": own,
            "taken_out": {p.name: p.out for p in self._phones if p.out is not None},
        }

    # ------------------------------------------------------------ helpers
    def _in(self) -> list[_Phone]:
        """The phones still in (with an actor: not closed, not stopped mid-batch)."""
        return [p for p in self._phones if p.out is None and p.actor is not None]

    def _lead(self) -> _Phone:
        phones = self._in()
        if not phones:
            why = "; ".join(f"{p.name} {p.out}" for p in self._phones)
            raise ProfilerError(f"No phone of the group {self.name!r} is left: {why}. What was measured is kept; fix "
                                "the phones and run the same command again.")
        return phones[0]

    def _take_out(self, phone: _Phone, why: str) -> None:
        import ray

        phone.out = why
        self._log(f"{self.name}: {phone.name} taken out: {why}")
        if phone.actor is not None:
            ray.kill(phone.actor)
            phone.actor = None

    def _gather(self, phones: Sequence[_Phone], method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every phone's actor at once: each one's result, or the error it raised."""
        import ray

        refs = [getattr(p.actor, method).remote(*args) for p in phones]
        outcomes: list[Any] = []
        for ref in refs:
            try:
                outcomes.append(ray.get(ref))
            except (ray.exceptions.RayError, ProfilerError) as e:
                outcomes.append(e)
        return outcomes

    def _check_conditions(self) -> None:
        """Every phone in measures under the lead's conditions (the phone's name aside)."""
        lead = self._lead()
        want = {k: v for k, v in lead.conditions.items() if k != "device"}
        for phone in self._in()[1:]:
            have = {k: v for k, v in phone.conditions.items() if k != "device"}
            if have != want:
                differ = ", ".join(f"{k}: {have.get(k)!r} against {want.get(k)!r}" for k in want if have.get(k) != want.get(k))
                raise ProfilerError(f"The phones of {self.name!r} must measure alike: {phone.name} differs from "
                                    f"{lead.name} in {differ}. Give them the same settings in devices.toml.")


def _cause(error: BaseException) -> str:
    """The one line a phone's failure comes down to (a Ray error's cause, else the error)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__
