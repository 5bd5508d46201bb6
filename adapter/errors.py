"""The root of `adapter`'s errors: bad input reported in one line (CLIs exit 2 with it)."""
from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["AdapterError", "USER_ERRORS", "exit_code_of"]


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


def exit_code_of(prog: str, work: Callable[[], int], *, on_interrupt: str) -> int:
    """`work()`'s exit code, or the CLI convention's when it stops early.

    Bad input (`USER_ERRORS`) prints `{prog}: error: {reason}` on one line, with no
    traceback, and gives 2; Ctrl-C prints `{prog}: interrupted; {on_interrupt}` (what
    the user can do now) and gives 130.
    """
    try:
        return work()
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {on_interrupt}", file=sys.stderr)
        return 130
