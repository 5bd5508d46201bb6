"""Measure single-op models on a device and build latency lookup tables."""
from profiler.benchmark_output import BenchmarkResult, parse_benchmark_output
from profiler.devices import Device, known_devices, open_device
from profiler.errors import ProfilerError

__all__ = ["BenchmarkResult", "Device", "ProfilerError", "known_devices", "open_device", "parse_benchmark_output"]
