"""The device interface and registry.

A device measures the latency of `.tflite` models on one target (this machine's CPU, a
phone's CPU, GPU or NNAPI).  `open_device(name)` is the one way to reach any device: `host` is
built in, other names come from the `devices.toml` registry, whose `kind` says which
backend opens them.

The registry imports no backend: `DEVICE_KINDS` names each built-in kind's factory as
`"module:function"`, imported when a device of that kind is opened (a backend imports
LiteRT or adb-shell, which a command that never opens it should not pay for), and a
backend never imports the registry.  `register_device_kind` adds a kind from outside
`profiler` (a plugin, a test) as a callable.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol, TypeAlias

from lut.table import Measurement, MeasurementFailure
from profiler.device_config import BACKENDS, load_device_configs, load_device_groups
from profiler.errors import ProfilerError
from profiler.timing import TimingPolicy

__all__ = [
    "DEVICE_KINDS",
    "Device",
    "DeviceFactory",
    "LoadProbe",
    "Measure",
    "Result",
    "known_devices",
    "open_device",
    "register_device_kind",
]

Result: TypeAlias = Measurement | MeasurementFailure
# `Device.measure`, or anything that measures like it
Measure: TypeAlias = Callable[[Sequence[tuple[str, bytes]]], Iterator[tuple[str, Result]]]


class Device(Protocol):
    """What the profiler needs of a device.

    A device may also have (the conditions monitor and `build_lut` look for them with
    `getattr`): `monitor_every` (entries per chunk between two looks at the reference),
    `monitor_defaults` (its own monitor settings, e.g. a phone's devices.toml `drift_*`
    lines), `vitals()` (what it says of itself now, e.g. a battery temperature) and
    `load_probe()` (a `LoadProbe` that sees other processes on it).
    """

    @property
    def name(self) -> str:
        """e.g. "host", "pixel"."""

    @property
    def backend(self) -> str:
        """"cpu", "gpu" or "nnapi" (`profiler.device_config.BACKENDS`)."""

    def conditions(self) -> dict[str, object]:
        """What a measurement depends on: device, backend, threads, delegate, flags."""

    def fingerprint(self) -> dict[str, object]:
        """Facts identifying the hardware and software (CPU model, OS, runtime versions …)."""

    def measure(self, models: Sequence[tuple[str, bytes]]) -> Iterator[tuple[str, Result]]:
        """Measure each `(model_id, tflite_bytes)`; yield `(model_id, result)` as each is done."""

    def close(self) -> None:
        """Let go of the device (a phone's connection and its files)."""


class LoadProbe(Protocol):
    """How much other processes use of a device (`profiler.monitor.HostLoad` on the host)."""

    def others_cores(self) -> float:
        """Cores other processes used since the last call."""

    def runnable(self) -> int:
        """Tasks running or ready to run now."""


class DeviceFactory(Protocol):
    """Opens a device of one kind: its name, devices.toml entry, backend, threads (None: the
    device's own setting) and how the host times a model (a backend that times otherwise
    ignores it)."""

    def __call__(self, name: str, config: Mapping[str, object], backend: str, threads: int | None, /, *,
                 timing: TimingPolicy | None = None) -> Device: ...


# kind -> "module:function" of its factory, imported when a device of the kind is opened.
_BUILT_IN_KINDS: dict[str, str] = {
    "host": "profiler.host:open_host",
    "adb": "profiler.adb:open_adb",
}
# kinds registered at run time with `register_device_kind` (they win over the built-in ones)
DEVICE_KINDS: dict[str, DeviceFactory] = {}


def register_device_kind(kind: str) -> Callable[[DeviceFactory], DeviceFactory]:
    """A decorator that makes `factory` open the devices.toml entries of `kind`."""

    def decorator(factory: DeviceFactory) -> DeviceFactory:
        DEVICE_KINDS[kind] = factory
        return factory

    return decorator


def _factory(kind: str) -> DeviceFactory:
    if kind in DEVICE_KINDS:
        return DEVICE_KINDS[kind]
    if kind not in _BUILT_IN_KINDS:
        raise ProfilerError(
            f"Unknown device kind {kind!r}. Known kinds: {', '.join(sorted({*_BUILT_IN_KINDS, *DEVICE_KINDS}))}. "
            f"Received: kind={kind!r}."
        )
    module, _, function = _BUILT_IN_KINDS[kind].partition(":")
    factory: DeviceFactory = getattr(importlib.import_module(module), function)
    return factory


def known_devices(devices_file: str | None = None) -> list[str]:
    """`host`, then the devices.toml registry's phones and groups by name."""
    return ["host", *sorted(load_device_configs(devices_file)), *sorted(load_device_groups(devices_file))]


def open_device(name: str, *, backend: str = "cpu", threads: int | None = None, devices_file: str | None = None,
                timing: TimingPolicy | None = None) -> Device:
    """Open the device called `name` for measuring with `backend` and `threads`.

    Args:
        name: "host", or a phone of the devices.toml registry.
        backend: "cpu", "gpu" or "nnapi" (the host has only "cpu").
        threads: the threads a model runs on; None takes the device's own setting
            (devices.toml), 1 on the host.
        devices_file: the devices.toml to read (None: ./devices.toml, then the user's).
        timing: how the host times each model (None: `TimingPolicy()`, made for single ops;
            whole models want longer). A phone times with benchmark_model as its
            devices.toml says and does not use it.
    """
    if backend not in BACKENDS:
        raise ProfilerError(f"`backend` must be one of {', '.join(BACKENDS)}. Received: backend={backend!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ProfilerError(f"`threads` must be a positive integer. Received: threads={threads!r}.")
    if name == "host":
        return _factory("host")(name, {}, backend, threads or 1, timing=timing)
    configs = load_device_configs(devices_file)
    groups = load_device_groups(devices_file)
    if name in groups:
        return _first_reachable(name, groups[name], backend, threads, devices_file, timing)
    if name not in configs:
        raise ProfilerError(
            f"Unknown device {name!r}. Known devices: {', '.join(known_devices(devices_file))}. "
            "Phones are listed in devices.toml (--devices FILE, ./devices.toml or ~/.config/phonefit/devices.toml). "
            f"Received: name={name!r}."
        )
    config = configs[name]
    kind = config.get("kind", "adb")
    return _factory(str(kind))(name, config, backend, threads, timing=timing)


def _first_reachable(group: str, phones: Sequence[str], backend: str, threads: int | None, devices_file: str | None,
                     timing: TimingPolicy | None) -> Device:
    """A group measured as one device (a whole model, an interleaved verdict): its first phone
    that opens. (`profiler.build_lut` measures a LUT with all of them: `profiler.farm`.)"""
    reasons = []
    for phone in phones:
        try:
            device = open_device(phone, backend=backend, threads=threads, devices_file=devices_file, timing=timing)
        except ProfilerError as e:
            reasons.append(f"{phone}: {e}")
            continue
        device.group = group  # type: ignore[attr-defined]  # an AdbDevice: its conditions name the group
        return device
    raise ProfilerError(f"No phone of the group {group!r} could be opened. " + " ".join(reasons))
