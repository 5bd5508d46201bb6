"""The root of `adapter`'s errors: bad input reported in one line (CLIs exit 2 with it)."""

__all__ = ["AdapterError", "USER_ERRORS"]


class AdapterError(ValueError):
    """Bad input for the adapter: a missing data set, an unknown model, a bad number.

    A `ValueError`, so callers that validate arguments the Python way still catch it.
    """


def _user_errors() -> tuple[type[Exception], ...]:
    from lut.spec import LutError
    from profiler.errors import ProfilerError

    return (AdapterError, LutError, ProfilerError)


# What a CLI reports as bad input (one line, exit 2): the roots of every package it uses.
USER_ERRORS = _user_errors()
