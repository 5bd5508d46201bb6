"""The root of `adapter`'s errors: bad input reported in one line (CLIs exit 2 with it).

The CLIs turn it, and every other package's error root, into exit codes through
`lut.cli.run_command`: `AdapterError` is a `lut.errors.PhonefitError`.
"""
from __future__ import annotations

from lut.errors import PhonefitError

__all__ = ["AdapterError"]


class AdapterError(PhonefitError, ValueError):
    """Bad input for the adapter: a missing data set, an unknown model, a bad number.

    A `ValueError`, so callers that validate arguments the Python way still catch it.
    """
