"""The device interface and registry.

A device measures the latency of `.tflite` models on one target (this machine's CPU, a
phone's CPU or GPU).  Every backend module registers a factory for its *kind* with
`register_device_kind`; `open_device(name)` is the one way to reach any device:
`host` is built in, other names come from the `devices.toml` registry.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from lut.table import Measurement, MeasurementFailure
from profiler.errors import ProfilerError

__all__ = ["Device", "DeviceOptions", "register_device_kind", "open_device", "known_devices", "DEVICE_KINDS"]

Result = Measurement | MeasurementFailure


class Device(Protocol):
    """What the profiler needs of a device."""

    name: str  # e.g. "host", "pixel"
    backend: str  # "cpu" or "gpu"

    def conditions(self) -> dict[str, object]:
        """What a measurement depends on: device, backend, threads, delegate, flags."""

    def fingerprint(self) -> dict[str, object]:
        """Facts identifying the hardware and software (CPU model, OS, runtime versions …)."""

    def measure(self, models: Sequence[tuple[str, bytes]]) -> Iterator[tuple[str, Result]]:
        """Measure each `(model_id, tflite_bytes)`; yield `(model_id, result)` as each is done."""

    def close(self) -> None: ...


class DeviceOptions(Protocol):
    backend: str
    threads: int


# kind -> factory(name, config, backend, threads) -> Device
DEVICE_KINDS: dict[str, Callable[..., Device]] = {}


def register_device_kind(kind: str) -> Callable:
    def decorator(factory: Callable[..., Device]) -> Callable[..., Device]:
        DEVICE_KINDS[kind] = factory
        return factory

    return decorator


def _configured_devices(devices_file: str | None) -> dict[str, dict]:
    """Device entries of the `devices.toml` registry, by name (host excluded)."""
    try:
        from profiler.device_config import load_device_configs
    except ImportError:  # no phone support installed in this build
        return {}
    return load_device_configs(devices_file)


def known_devices(devices_file: str | None = None) -> list[str]:
    return ["host", *sorted(_configured_devices(devices_file))]


def open_device(name: str, *, backend: str = "cpu", threads: int | None = None, devices_file: str | None = None) -> Device:
    """Open the device called `name` for measuring with `backend` and `threads`.

    `threads=None` takes the device's own setting (devices.toml), 1 on the host.
    """
    if backend not in ("cpu", "gpu"):
        raise ProfilerError(f"`backend` must be 'cpu' or 'gpu'. Received: backend={backend!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ProfilerError(f"`threads` must be a positive integer. Received: threads={threads!r}.")
    import profiler.host  # noqa: F401  (registers the built-in kind)

    if name == "host":
        return DEVICE_KINDS["host"](name, {}, backend, threads or 1)
    configs = _configured_devices(devices_file)
    if name not in configs:
        raise ProfilerError(
            f"Unknown device {name!r}. Known devices: {', '.join(known_devices(devices_file))}. "
            "Phones are listed in devices.toml (--devices FILE, ./devices.toml or ~/.config/phonefit/devices.toml)."
        )
    config = configs[name]
    kind = config.get("kind", "adb")
    if kind not in DEVICE_KINDS:
        __import__(f"profiler.{kind}")
    return DEVICE_KINDS[kind](name, config, backend, threads)
