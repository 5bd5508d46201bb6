"""Measure single-op models on a device and build latency lookup tables."""
from profiler.devices import Device, known_devices, open_device
from profiler.errors import ProfilerError

__all__ = ["Device", "ProfilerError", "known_devices", "open_device"]
