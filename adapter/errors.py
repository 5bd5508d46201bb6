"""The root of `adapter`'s errors: bad input reported in one line (CLIs exit 2 with it)."""

__all__ = ["AdapterError"]


class AdapterError(ValueError):
    """Bad input for the adapter: a missing data set, an unknown model, a bad number.

    A `ValueError`, so callers that validate arguments the Python way still catch it.
    """
