"""The one place phonefit finds LiteRT's interpreter: `ai_edge_litert`, else `tflite_runtime`.

LiteRT (`ai-edge-litert`) is the maintained successor of `tflite-runtime`; either runs
`.tflite` models on this machine.  The import stays inside `interpreter_class` (not at the
top of this module): LiteRT loads a native library, and `lut` must import without it.
"""
from __future__ import annotations

import functools
from importlib import metadata
from typing import Any

from lut.errors import LutError

__all__ = ["LiteRTMissingError", "interpreter_class", "litert_version"]

_DISTRIBUTIONS = ("ai-edge-litert", "tflite-runtime")


class LiteRTMissingError(LutError):
    """Neither LiteRT nor tflite-runtime is installed."""


@functools.cache
def interpreter_class() -> type[Any]:
    """LiteRT's `Interpreter` class (tflite-runtime's where only that is installed).

    Raises `LiteRTMissingError` saying what to install when neither is.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as e:
            raise LiteRTMissingError(
                "Running .tflite models on this machine needs LiteRT: pip install ai-edge-litert (or tflite-runtime). "
                "Received: neither ai_edge_litert nor tflite_runtime can be imported."
            ) from e
    cls: type[Any] = Interpreter
    return cls


def litert_version() -> str:
    """e.g. "ai-edge-litert 2.3.0", the installed runtime's distribution and version, or "none"."""
    for dist in _DISTRIBUTIONS:
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "none"
