"""The host's measuring process: LiteRT and numpy only, one model timed per request.

`profiler.host.HostDevice` starts it (`python -m profiler.host_worker`) and sends it models
over a pipe; it loads each into a LiteRT interpreter and times it (`profiler.timing`). The
models are converted elsewhere: TensorFlow never loads here. On an Intel Xeon VM a process
that had converted hundreds of models with TensorFlow read the reference model 2–8% slower
than a fresh process measured right after it, while a LiteRT-only process that measured 2304
models read it as it started (docs/profiler-figures.md); on a phone `benchmark_model` is its
own process too. A model that crashes LiteRT ends this process, not the build. It ignores
Ctrl-C, which the process that started it handles.

The protocol is pickled frames on a private copy of stdout (file descriptor 1 itself goes to
stderr, where LiteRT's native logging belongs). The first frame on stdin is (threads,
`TimingPolicy`); the process answers ("ready", pid), or ("error", message) without LiteRT.
Then each frame on stdin is a model's bytes, answered by its `Measurement` or
`MeasurementFailure`. End of stdin ends the process.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from typing import Any, BinaryIO

import numpy as np

from lut.cli import quiet_litert_notice
from lut.litert import LiteRTMissingError, interpreter_class
from lut.table import Measurement, MeasurementFailure
from profiler.timing import TimingPolicy, time_interpreter

__all__ = ["load_interpreter", "measure_one", "serve"]


def load_interpreter(model: bytes, threads: int) -> Any:
    """A LiteRT interpreter for `model` (XNNPACK on, as in the LiteRT default), tensors allocated
    and inputs set to seeded random values. Raises `LiteRTMissingError` without LiteRT."""
    interpreter = interpreter_class()(model_content=model, num_threads=threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        shape, dtype = detail["shape"], detail["dtype"]
        if np.issubdtype(dtype, np.floating):
            data = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            data = rng.integers(info.min, info.max, size=shape, dtype=dtype)
        interpreter.set_tensor(detail["index"], data)
    return interpreter


def measure_one(model: bytes, threads: int, policy: TimingPolicy) -> Measurement | MeasurementFailure:
    """Load and time one model: with one thread by that thread's CPU clock, else by wall time."""
    clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
    try:
        interpreter = load_interpreter(model, threads)
    except (ValueError, RuntimeError) as e:
        return MeasurementFailure(f"LiteRT could not load the model: {e}")
    return time_interpreter(interpreter, policy, clock)


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Read the settings, then answer each pickled model on `requests` with its result on `replies`."""
    def send(obj: object) -> None:
        pickle.dump(obj, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()

    threads, policy = pickle.load(requests)
    try:
        interpreter_class()
    except LiteRTMissingError as e:
        send(("error", str(e)))
        return
    send(("ready", os.getpid()))
    while True:
        try:
            model = pickle.load(requests)
        except EOFError:
            return
        send(measure_one(model, threads, policy))


def main() -> None:
    # Ctrl-C reaches the whole foreground process group: the process that started this one
    # handles it and closes stdin, so that no model is taken for one that crashed LiteRT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_litert_notice()  # LiteRT's once-per-process "Created … XNNPACK delegate" line
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # native code that prints to stdout must not corrupt the replies
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
