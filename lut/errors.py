"""The ground floor of phonefit's errors: `PhonefitError`, and `lut`'s own root `LutError`.

Every package's error root (`LutError` here, `profiler.errors.ProfilerError`,
`adapter.errors.AdapterError`) subclasses `PhonefitError`, so the one CLI runner
(`lut.cli.run_command`) reports any of them as bad input, in one line with exit 2, without
importing the packages above `lut`.
"""
from __future__ import annotations

__all__ = ["LutError", "PhonefitError"]


class PhonefitError(Exception):
    """Bad input or an unusable setup, told in one line: what was expected, what was received,
    how to fix it. CLIs print it without a traceback and exit 2."""


class LutError(PhonefitError, ValueError):
    """Root of the errors raised by `lut` for bad input (files, models, specs).

    A `ValueError` too, so callers that validate arguments the Python way still catch it.
    """
