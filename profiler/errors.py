"""The root of `profiler`'s errors: bad input or an unusable device, reported in one line."""

from lut.errors import PhonefitError

__all__ = ["ProfilerError"]


class ProfilerError(PhonefitError, RuntimeError):
    """Bad input for the profiler, or a device that cannot be used (CLIs exit 2 with it)."""
