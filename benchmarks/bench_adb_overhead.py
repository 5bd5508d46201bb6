"""Per-entry overhead of phonefit's batched ADB protocol next to the naive one, on the loopback daemon.

    python benchmarks/bench_adb_overhead.py [--models 200] [--batch-size N] [--rounds 3]

Both protocols measure the same single-op `.tflite` models (made by `SingleOpFactory`) on
the same loopback ADB daemon (tests/adb_daemon.py, the real wire protocol over 127.0.0.1),
over the same adb-shell connection:

* naive: per model, one `push` and one `shell` running `benchmark_model`, its output parsed
  on the host;
* batched (`AdbDevice.measure`): per batch, one push of the batch's models packed in one
  archive, one shell call running `android_bench/run_batch.sh` (which checks and unpacks
  the archive and runs every model), one pull of the records.

Both create one file per model on the phone and remove none while measuring (the session
directory goes at the end): the daemon, like adbd, replaces a pushed file by unlinking it,
so the naive protocol pushes each round to new paths, as a LUT build pushes each model
once.

What is timed.  The daemon's `benchmark_model` here is a POSIX sh stand-in that prints a
real-format output at once, because the LiteRT stand-in of the tests starts Python for
every model (about 0.5 s), which would bury the protocol cost being compared.  Both
protocols run it under the same `timeout --foreground` wrapper (the runner's).  What the
phone must do per model whatever the protocol (write the model's file, exec `timeout` and
the stand-in) is timed on the phone itself (the same work in a loop in one shell, by the
phone's clock) right before, between and after the two protocols on each chunk of
models, and subtracted:

    overhead per entry = (wall time of the protocol) / models - device work per model

so the figure is what the protocol itself costs per entry: round trips, the daemon's
service start-up, runner bookkeeping (unpacking the archive included, less the files'
writing), parsing.  On a phone over Wi-Fi each round trip costs milliseconds, which
widens the gap further (the naive protocol makes about six round trips per entry, the
batched one a few per batch).  Writing a file is the phone's file system's cost:
`--phone-dir` says where the daemon keeps the phone's files (on the 2-core CI machine a
new 3 KB file takes 0.13–0.5 ms on its ext4 disk, erratically, and 0.03 ms on tmpfs).

The machine this runs on may be shared, so the timings are interleaved chunk by chunk (a
chunk is one batch, the protocols in rotating order) and reported three ways: the median
over chunks with quartiles; the best of the rounds per chunk (each chunk's fastest wall
time minus its fastest device work: what the protocol costs when other load leaves it
alone, as timeit's minimum); and the ratio of naive to batched overhead from each.  The
ADB streams and messages the computer sends per entry do not depend on the load at all.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lut.spec import LayerSpec  # noqa: E402
from profiler.adb import AdbDevice  # noqa: E402
from profiler.benchmark_output import parse_benchmark_output  # noqa: E402
from profiler.device_config import parse_adb_settings  # noqa: E402
from profiler.single_op import SingleOpFactory  # noqa: E402

_STAND_IN = """#!/bin/sh
# benchmark_model stand-in: the real tool's output for a 40 us op, printed at once.
echo "INFO: Graph: [${1#--graph=}]"
echo "INFO: count=1 curr=52 p5=52 median=52 p95=52"
echo "INFO: count=5 first=41 curr=40 min=39 max=41 avg=40.2 std=0 p5=39 median=40 p95=41"
echo "INFO: Inference timings in us: Init: 900, First inference: 52, Warmup (avg): 52, Inference (avg): 40.2"
"""
_FLAGS = ("--num_threads=1", "--warmup_runs=1", "--num_runs=5", "--min_secs=0")
_TIMEOUT_S = 60


def _models(count: int) -> list[tuple[str, bytes]]:
    """`count` distinct single-op models: 1x1 convolutions and 3x3 depthwise convolutions."""
    factory, specs = SingleOpFactory(), []
    for i in range(count):
        channels = 8 + i // 2
        if i % 2:
            specs.append(LayerSpec("depthwise_conv2d", 8, 8, channels, channels, kernel=(3, 3), padding="same"))
        else:
            specs.append(LayerSpec("conv2d", 8, 8, 8, channels))
    return [(spec.key, factory.build(spec)) for spec in specs]


_DAEMON = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from tests.adb_daemon import LoopbackAdbDaemon
with LoopbackAdbDaemon(sys.argv[2]) as daemon:
    print(daemon.port, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
"""


class _DaemonProcess:
    """The loopback daemon in a process of its own, as a phone is: in this process its
    threads would compete with the client for the GIL on every round trip."""

    def __init__(self, root: Path):
        repo = str(Path(__file__).resolve().parents[1])
        self._process = subprocess.Popen([sys.executable, "-c", _DAEMON, repo, str(root)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.host, self.port = "127.0.0.1", int(self._process.stdout.readline())

    def __enter__(self) -> _DaemonProcess:
        return self

    def __exit__(self, *exc) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=30)


def _device(work: Path, daemon: _DaemonProcess, batch_size: int | None) -> AdbDevice:
    entry = {
        "address": f"{daemon.host}:{daemon.port}",
        "benchmark_model": str(work / "benchmark_model"),
        "adb_key": str(work / "adbkey"),
        **({"batch_size": batch_size} if batch_size else {}),
        "drift_every": 0,
        "cooldown_s": 0,
        "model_timeout_s": _TIMEOUT_S,
        "warmup_runs": 1,
        "num_runs": 5,
        "min_secs": 0,
        "cpu": {"flags": []},
    }
    return AdbDevice(parse_adb_settings("loopback", entry, source=str(work / "devices.toml")), "cpu", 1)


_NAIVE_RUNS = itertools.count()


def _naive(device: AdbDevice, models: list[tuple[str, bytes]], remote: str) -> float:
    """One push and one shell per model, output parsed on the host; returns the wall time.

    Each call pushes to paths of its own, as a LUT build pushes every model once: like the
    batched protocol, the phone creates one file per model and removes none meanwhile.
    """
    adb, start, run = device._link.adb, time.perf_counter(), next(_NAIVE_RUNS)
    for i, (_, data) in enumerate(models):
        path = f"{remote}/naive/{run}/m{i:03d}.tflite"
        adb.push(io.BytesIO(data), path)
        command = ["timeout", "--foreground", "-k", "2", str(_TIMEOUT_S), f"{device._settings.remote_dir}/benchmark_model",
                   f"--graph={path}", *_FLAGS]
        parse_benchmark_output(adb.shell(" ".join(map(shlex.quote, command))))
    return time.perf_counter() - start


def _batched(device: AdbDevice, models: list[tuple[str, bytes]]) -> float:
    start = time.perf_counter()
    results = list(device.measure(models))
    elapsed = time.perf_counter() - start
    failed = [model_id for model_id, result in results if not hasattr(result, "median_us")]
    if failed:
        raise SystemExit(f"batched run failed for {failed[:3]}")
    return elapsed


def _message_counts(device: AdbDevice, run) -> dict[str, int]:
    """ADB streams opened and messages sent by the computer while `run()` runs: figures
    that do not depend on the load of this machine, and that set the cost on a real link,
    where every message the computer waits for costs a network round trip."""
    adb, counts = device._link.adb, {"streams": 0, "messages": 0}
    io_manager = adb._io_manager
    open_stream, send = adb._open, io_manager.send

    def counting_open(*args, **kwargs):
        counts["streams"] += 1
        return open_stream(*args, **kwargs)

    def counting_send(*args, **kwargs):
        counts["messages"] += 1
        return send(*args, **kwargs)

    adb._open, io_manager.send = counting_open, counting_send
    try:
        run()
    finally:
        del adb._open, io_manager.send  # back to the class's methods
    return counts


_WORK_RUNS = itertools.count()


def _device_work(device: AdbDevice, remote: str, chunk: list[tuple[str, bytes]]) -> float:
    """Seconds the phone spends on the models of `chunk` with no protocol at all: per model,
    writing a new file of the model's size and running the benchmark command on a model,
    in a loop in one shell on the phone, timed by the phone's clock (`date +%s%N`, GNU and
    toybox date).  Both protocols have the phone do that much per model, whatever they
    send: a file per model (benchmark_model reads its model from a file) and one run.
    Timed there because processes started by the daemon run in conditions (session,
    environment) that this script's own processes do not share."""
    directory = shlex.quote(f"{remote}/work/{next(_WORK_RUNS)}")
    command = (
        f"timeout --foreground -k 2 {_TIMEOUT_S} {shlex.quote(device._settings.remote_dir + '/benchmark_model')} "
        f"--graph={shlex.quote(remote + '/work.tflite')} {' '.join(_FLAGS)} >> {shlex.quote(remote + '/work.out')}"
    )
    # the builtin printf writes the file: no process but the one a model's run takes
    sizes = " ".join(str(len(data)) for _, data in chunk)
    output = device._link.adb.shell(
        f"mkdir -p {directory}; s=$(date +%s%N); i=0; for size in {sizes}; do "
        f"printf \"%${{size}}s\" '' > {directory}/m$i.tflite; {command}; i=$((i + 1)); done; "
        "e=$(date +%s%N); echo $((e - s))"
    )
    return int(output.split()[-1]) / 1e9


def _chunk_timings(device: AdbDevice, chunk: list[tuple[str, bytes]], remote: str, turn: int) -> dict[str, tuple[float, float]]:
    """(wall s, device work s) of both protocols on one chunk (one batch), timed back to back.

    The device work is timed before, between and after the two protocols (which go in
    rotating order), and each protocol's is the mean of the two timings around it, so a
    change of load on this (shared) machine hits a protocol and its device work alike.
    """
    runs = {"naive": lambda: _naive(device, chunk, remote), "batched": lambda: _batched(device, chunk)}
    order = list(runs) if turn % 2 == 0 else list(reversed(runs))
    works = [_device_work(device, remote, chunk)]
    walls = {}
    for name in order:
        walls[name] = runs[name]()
        works.append(_device_work(device, remote, chunk))
    return {name: (walls[name], (works[i] + works[i + 1]) / 2) for i, name in enumerate(order)}


def _measure(args: argparse.Namespace, models: list[tuple[str, bytes]]) -> tuple[int, dict, dict]:
    """(batch size, timings, message counts); timings[name] lists (chunk, models, wall s, work s)."""
    timings: dict[str, list[tuple[int, int, float, float]]] = {"naive": [], "batched": []}
    with tempfile.TemporaryDirectory(prefix="bench-adb-", dir=args.phone_dir) as tmp:
        work = Path(tmp)
        (work / "benchmark_model").write_text(_STAND_IN)
        (work / "benchmark_model").chmod(0o755)
        with _DaemonProcess(work / "phone") as daemon:
            device = _device(work, daemon, args.batch_size)
            batch_size = device._settings.batch_size
            try:
                remote = device._session
                device._link.adb.push(io.BytesIO(models[0][1]), f"{remote}/work.tflite")
                _batched(device, models[:8])  # warm both paths: imports, daemon threads, caches
                _naive(device, models[:8], remote)
                chunks = [models[i : i + batch_size] for i in range(0, len(models), batch_size)]
                for round_ in range(args.rounds):
                    for index, chunk in enumerate(chunks):
                        for name, (wall, work_s) in _chunk_timings(device, chunk, remote, round_ + index).items():
                            timings[name].append((index, len(chunk), wall, work_s))
                    print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
                counts = {
                    "naive": _message_counts(device, lambda: _naive(device, models, remote)),
                    "batched": _message_counts(device, lambda: _batched(device, models)),
                }
            finally:
                device.close()
    return batch_size, timings, counts


def _best_of_rounds_ms(timings: list[tuple[int, int, float, float]]) -> float:
    """Per-entry overhead from each chunk's least disturbed round: its fastest wall time
    minus its fastest device work, summed over the chunks (what timeit's min does)."""
    chunks = {index: count for index, count, _, _ in timings}
    overhead_s = sum(
        min(wall for i, _, wall, _ in timings if i == index) - min(work for i, _, _, work in timings if i == index)
        for index in chunks
    )
    return overhead_s / sum(chunks.values()) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=200, help="single-op models per protocol and round")
    parser.add_argument("--batch-size", type=int, help="models per batch of the batched protocol (default: AdbDevice's)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all models")
    parser.add_argument("--phone-dir", help="where the daemon keeps the phone's files (default: the temporary "
                        "directory); both protocols create a file per model there, at that file system's cost")
    args = parser.parse_args(argv)
    print(f"making {args.models} single-op models ...", file=sys.stderr)
    batch_size, timings, counts = _measure(args, _models(args.models))
    samples = {name: [(wall - work) / count * 1e3 for _, count, wall, work in rows] for name, rows in timings.items()}
    samples["work"] = [work / count * 1e3 for _, count, _, work in timings["batched"]]
    median = {name: statistics.median(values) for name, values in samples.items()}
    quartiles = {name: statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3 for name, values in samples.items()}
    print(f"{args.models} single-op models x {args.rounds} rounds, batch size {batch_size}, loopback ADB daemon "
          f"(own process) on 127.0.0.1, phone files in {args.phone_dir or tempfile.gettempdir()}; per entry, "
          f"median [quartiles] of {len(samples['work'])} chunks")
    print(f"device work (model file + timeout + stand-in): {_ms(median['work'], quartiles['work'])}")
    print(f"naive   (push + shell per model):   overhead {_ms(median['naive'], quartiles['naive'])}")
    print(f"batched (push/run/pull per batch):  overhead {_ms(median['batched'], quartiles['batched'])}")
    for name, label in (("naive", "naive  "), ("batched", "batched")):
        print(f"{label} ADB streams opened per entry: {counts[name]['streams'] / args.models:6.3f}, "
              f"messages sent per entry: {counts[name]['messages'] / args.models:6.2f}")
    best = {name: _best_of_rounds_ms(rows) for name, rows in timings.items()}
    print(f"best of {args.rounds} rounds per chunk: naive overhead {best['naive']:.2f} ms, batched {best['batched']:.2f} ms per entry")
    ratios = [n / b for n, b in zip(samples["naive"], samples["batched"]) if b > 0]
    print(f"batched per-entry overhead is lower than naive by: {statistics.median(ratios):.1f}x (median of per-chunk "
          f"ratios), {_ratio(median['naive'], median['batched'])} (ratio of medians), "
          f"{_ratio(best['naive'], best['batched'])} (best of rounds); target: >= 10x")
    return 0


def _ratio(naive: float, batched: float) -> str:
    return f"{naive / batched:.1f}x" if batched > 0 else "n/a (batched overhead not above the noise)"


def _ms(value: float, quartiles: list[float]) -> str:
    return f"{value:6.2f} ms [{quartiles[0]:.2f} .. {quartiles[2]:.2f}]"


if __name__ == "__main__":
    sys.exit(main())
