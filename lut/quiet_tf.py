"""Import TensorFlow without its start-up chatter on stderr, so a CLI's error stays one line.

TensorFlow's C++ core logs through absl before any Python setting can reach it
("All log messages before absl::InitializeLog() …", oneDNN and CUDA notices); the only
way to keep those lines off a user's terminal is to point file descriptor 2 elsewhere
while the library loads.  Every CLI calls this first; errors raised by the import itself
are re-raised after stderr is restored.
"""
from __future__ import annotations

import os
import sys

__all__ = ["import_tensorflow_quietly"]


def import_tensorflow_quietly() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
