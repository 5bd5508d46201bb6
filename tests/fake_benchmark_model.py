#!/usr/bin/env python3
"""A host stand-in for TFLite's `benchmark_model`, pushed by the tests as `benchmark_model`.

It accepts the tool's flags in `--flag=value` form (`--graph --num_threads --num_runs
--warmup_runs --min_secs --max_secs --warmup_min_secs --run_delay --use_gpu --use_xnnpack
--enable_op_profiling --verbose`, the GPU delegate's `--gpu_backend
--gpu_precision_loss_allowed --gpu_experimental_enable_quant` and NNAPI's `--use_nnapi
--nnapi_accelerator_name`), echoes the ones given as the real tool does (`Use gpu: [1]`,
`Allow lower precision in gpu: [0]`, `GPU backend: [cl]`, `Use NNAPI: [1]`, `NNAPI
accelerator name: [google-edgetpu]`), warns about others
(`WARN: Unconsumed cmdline flags: …`) and fails on a value it cannot parse.  It loads the
graph with LiteRT, times it in a warm-up phase and a measured phase with the real tool's
stopping rule (at least N runs and at least S seconds, at most `--max_secs`), and prints the
real tool's recent output format: echoed parameters, `count=… first=… curr=… min=… max=…
avg=… std=… p5=… median=… p95=…` per phase (`count=1 curr=…` for a phase of one run),
`Inference timings in us: Init: …, First inference: …, Warmup (avg): …, Inference (avg): …`
and the memory footprint.  Figures are in microseconds, numbers printed as C++ streams print
them (6 significant digits).

With `--use_gpu=true` it still times on the CPU but prints the GPU delegate's lines:
`Created TensorFlow Lite delegate for GPU.`, `VERBOSE: Replacing N out of N node(s) with
delegate (TfLiteGpuDelegateV2) node, yielding 1 partitions for the whole graph.` and
`Explicitly applied GPU delegate, and the model graph will be completely executed by the
delegate.`  With `--use_nnapi=true` likewise NNAPI's: `NNAPI accelerators available:
[google-edgetpu,nnapi-reference]` (the phone's, `NNAPI_ACCELERATORS`), `Created TensorFlow Lite
delegate for NNAPI.`, `Replacing N out of N node(s) with delegate (TfLiteNnapiDelegate) node,
yielding 1 partitions for the whole graph.` and `Explicitly applied NNAPI delegate, and the
model graph will be completely executed by the delegate.`; an `--nnapi_accelerator_name` the
phone does not have gets the real tool's `Could not find the specified NNAPI accelerator: …`
and `NNAPI acceleration is unsupported on this platform.` (the graph then runs on the CPU).
`--enable_op_profiling=true` is accepted and echoed; no per-op table is printed.

Faults come from the JSON environment variable PHONEFIT_FAKE_BENCHMARK, which the loopback
ADB daemon (tests/adb_daemon.py) sets: `state_dir` (where the models-run counter lives),
`drop_after_models` (the first run started once that many models have run asks the daemon,
once, to reset its connections, and waits there to be hung up), and lists of file-name substrings `hang_models` (print the header, then
sleep until killed), `garbage_models` (print garbage instead of timings, exit 0),
`crash_models` (print a kernel error, exit 134 as after SIGABRT) and `partial_gpu_models`
(with `--use_gpu=true`, the delegate takes all nodes but one extra unsupported node it
reports: `Replacing N out of N+1 node(s) … yielding 1 partitions`, `… partially executed by
the delegate w/ 1 delegate kernels.`), `partial_nnapi_models` (the same with `--use_nnapi=true`:
`… with delegate (TfLiteNnapiDelegate) node …`, `Explicitly applied NNAPI delegate, and the model
graph will be partially executed by the delegate w/ 1 delegate kernels.`), and the slow-down switch `slow_runs` = [first, end)
with `slow_factor` (models started while the models-run counter is in the window report
their timings that many times slower, as a throttled phone does), `steady_us` (every run
takes that long, times the slow factor: a phone whose timings do not wander with the host's
load, for tests of what is done with a slow-down rather than of live timings), and `gpu_unavailable`
(with `--use_gpu=true`, the GPU delegate cannot be created, as on a phone without OpenCL: the
tool warns `GPU acceleration is unsupported on this platform.` and runs the graph on the
CPU, exit 0).  Without that variable
it runs with no faults and counts nothing.  It imports nothing from the project, so it runs wherever it is pushed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

FAKE_BENCHMARK_ENV = "PHONEFIT_FAKE_BENCHMARK"  # the name tests/adb_daemon.py sets
_MODELS_RUN_FILE = "models_run"
_DROP_REQUEST_FILE = "drop_requested"
_DROP_DONE_FILE = "drop_done"
_CRASH_EXIT_STATUS = 134  # 128 + SIGABRT, what a shell reports for an aborted benchmark_model
NNAPI_ACCELERATORS = ("google-edgetpu", "nnapi-reference")  # what a Pixel's NNAPI lists


def _parse_bool(text: str) -> bool:
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise ValueError(text)


# name -> (parser, default, label echoed as `INFO: <label>: [value]`), in the real tool's order.
_FLAGS = {
    "num_runs": (int, 50, "Min num runs"),
    "min_secs": (float, 1.0, "Min runs duration (seconds)"),
    "max_secs": (float, 150.0, "Max runs duration (seconds)"),
    "run_delay": (float, -1.0, "Inter-run delay (seconds)"),
    "num_threads": (int, -1, "Num threads"),
    "warmup_runs": (int, 1, "Min warmup runs"),
    "warmup_min_secs": (float, 0.5, "Min warmup runs duration (seconds)"),
    "verbose": (_parse_bool, False, "Log parameter values verbosely"),
    "graph": (str, "", "Graph"),
    "enable_op_profiling": (_parse_bool, False, "Enable op profiling"),
    "use_gpu": (_parse_bool, False, "Use gpu"),
    "gpu_precision_loss_allowed": (_parse_bool, True, "Allow lower precision in gpu"),
    "gpu_experimental_enable_quant": (_parse_bool, True, "Enable running quant models in gpu"),
    "gpu_backend": (str, "", "GPU backend"),
    "use_nnapi": (_parse_bool, False, "Use NNAPI"),
    "nnapi_accelerator_name": (str, "", "NNAPI accelerator name"),
    "use_xnnpack": (_parse_bool, False, "Use xnnpack"),
}


def _fmt(value: float) -> str:
    """A double as a default C++ ostream prints it."""
    return f"{value:.6g}"


def _log(line: str = "", level: str = "INFO") -> None:
    print(f"{level}: {line}" if line else "", flush=True)


def _parse_flags(argv: list[str]) -> tuple[dict, set[str], list[str]]:
    """(values, names given, unconsumed args); raises ValueError on a value it cannot parse."""
    values = {name: default for name, (_, default, _) in _FLAGS.items()}
    given: set[str] = set()
    unconsumed = []
    for arg in argv:
        name, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not eq or name not in _FLAGS:
            unconsumed.append(arg)
            continue
        try:
            values[name] = _FLAGS[name][0](text)
        except ValueError as e:
            raise ValueError(arg) from e
        given.add(name)
    return values, given, unconsumed


def _echo_parameters(values: dict, given: set[str]) -> None:
    _log(f"Log parameter values verbosely: [{int(values['verbose'])}]")
    for name, (_, _, label) in _FLAGS.items():
        if name == "verbose" or (name not in given and not values["verbose"] and name != "graph"):
            continue
        value = values[name]
        text = str(int(value)) if isinstance(value, bool) else _fmt(value) if isinstance(value, float) else str(value)
        _log(f"{label}: [{text}]")
        if name == "graph":
            _log("Signature to run: []")
    if "num_threads" in given:
        _log(f"#threads used for CPU inference: [{values['num_threads']}]")


# ----------------------------------------------------------------------------- faults


def _faults() -> dict:
    spec = os.environ.get(FAKE_BENCHMARK_ENV)
    return json.loads(spec) if spec else {}


def _matches(faults: dict, kind: str, graph: str) -> bool:
    name = os.path.basename(graph)
    return any(part in name for part in faults.get(kind, ()))


def _update_counter(state_dir: Path, change) -> int:
    """Apply `change` to the models-run counter under a lock; the counter is replaced atomically."""
    counter = state_dir / _MODELS_RUN_FILE
    with open(state_dir / (_MODELS_RUN_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        count = int(counter.read_text()) if counter.exists() else 0
        new = change(count)
        if new != count:
            scratch = state_dir / f"{_MODELS_RUN_FILE}.{os.getpid()}"
            scratch.write_text(str(new))
            os.replace(scratch, counter)
    return new


def _drop_connection_if_due(faults: dict) -> None:
    """The first stand-in started once `drop_after_models` models ran asks the daemon to drop."""
    limit = faults.get("drop_after_models")
    if limit is None:
        return
    state = Path(faults["state_dir"])
    if _update_counter(state, lambda n: n) < limit:
        return
    try:
        os.close(os.open(state / _DROP_REQUEST_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # the drop happened already: it is one-shot
    while not (state / _DROP_DONE_FILE).exists():  # the hang-up normally ends this process here
        time.sleep(0.02)


def _count_model_run(faults: dict) -> None:
    if "state_dir" in faults:
        _update_counter(Path(faults["state_dir"]), lambda n: n + 1)


def _slow_factor(faults: dict) -> float:
    """The phone's slow-down switch: models started while the models-run counter is in
    `slow_runs` ([first, end)) report their timings times `slow_factor` (a throttled phone)."""
    window = faults.get("slow_runs")
    if window is None:
        return 1.0
    ran = _update_counter(Path(faults["state_dir"]), lambda n: n)
    return float(faults.get("slow_factor", 2.0)) if window[0] <= ran < window[1] else 1.0


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def _print_garbage(graph: str) -> None:
    seed = hashlib.sha256(graph.encode()).digest()
    for i in range(4):
        noise = hashlib.sha256(seed + bytes([i])).hexdigest()
        print(f"@@ {noise[:24]} ~~ {noise[24:40]} ## {noise[40:]}", flush=True)


def _print_crash(op_name: str) -> None:
    _log("tensorflow/lite/kernels/kernel_util.cc:355 dims->size != 4 (3 != 4)", "ERROR")
    _log(f"Node number 0 ({op_name}) failed to prepare.", "ERROR")
    _log("Failed to allocate tensors!", "ERROR")
    _log("Benchmarking failed.", "ERROR")


# ----------------------------------------------------------------------------- timing


def _load(graph: str, values: dict, given: set[str]):
    """The interpreter, tensors allocated and inputs filled.  LiteRT itself prints `Created
    TensorFlow Lite XNNPACK delegate for CPU.` when it applies XNNPACK, as benchmark_model
    does; like the real tool, no default XNNPACK when another delegate (GPU, NNAPI) is asked for."""
    # Imported here, not at the top: bad flags, a missing graph and a hang answer without loading LiteRT.
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    xnnpack_off = values["use_gpu"] or values["use_nnapi"] or ("use_xnnpack" in given and not values["use_xnnpack"])
    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if xnnpack_off else OpResolverType.AUTO
    threads = values["num_threads"] if values["num_threads"] > 0 else None
    interpreter = Interpreter(model_path=graph, num_threads=threads, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        dtype = detail["dtype"]
        if np.issubdtype(dtype, np.floating):
            data = rng.standard_normal(detail["shape"]).astype(dtype)
        else:
            info = np.iinfo(dtype)
            data = rng.integers(info.min, info.max, size=detail["shape"], dtype=dtype)
        interpreter.set_tensor(detail["index"], data)
    return interpreter


def _run_phase(interpreter, min_runs: int, min_secs: float, max_secs: float, run_delay: float) -> list[int]:
    """Durations in µs: at least `min_runs` runs and `min_secs`, stopping past `max_secs`."""
    durations: list[int] = []
    start = time.perf_counter()
    while (len(durations) < min_runs or time.perf_counter() - start < min_secs) and time.perf_counter() - start <= max_secs:
        t0 = time.perf_counter_ns()
        interpreter.invoke()
        durations.append(max((time.perf_counter_ns() - t0) // 1000, 1))
        if run_delay > 0:
            time.sleep(run_delay)
    return durations


def _stats_line(durations: list[int]) -> str:
    if not durations:
        return "count=0"
    ordered = sorted(durations)
    percentile = lambda p: ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]  # noqa: E731
    tail = f" p5={percentile(5)} median={percentile(50)} p95={percentile(95)}"
    if len(durations) == 1:
        return f"count=1 curr={durations[0]}{tail}"
    mean = sum(durations) / len(durations)
    std = math.sqrt(max(sum(d * d for d in durations) / len(durations) - mean * mean, 0.0))
    return (
        f"count={len(durations)} first={durations[0]} curr={durations[-1]} min={ordered[0]} max={ordered[-1]}"
        f" avg={_fmt(mean)} std={int(round(std))}{tail}"
    )


def _mean(durations: list[int]) -> float:
    return sum(durations) / len(durations) if durations else math.nan  # as the tool's empty Stat


def _phase(interpreter, runs: int, min_secs: float, values: dict) -> list[int]:
    _log(
        f"Running benchmark for at least {runs} iterations and at least {_fmt(min_secs)} seconds"
        f" but terminate if exceeding {_fmt(values['max_secs'])} seconds."
    )
    durations = _run_phase(interpreter, runs, min_secs, values["max_secs"], values["run_delay"])
    if values.get("steady_us") is not None:  # a phone whose timings do not wander with the host's load
        durations = [int(values["steady_us"])] * len(durations)
    factor = values.get("slow_factor", 1.0)
    durations = [max(int(d * factor), 1) for d in durations]
    _log(_stats_line(durations))
    _log()
    return durations


def _print_delegate_verdict(name: str, kernel: str, nodes: int, partial: bool) -> None:
    """TFLite's `Replacing …` line and benchmark_model's verdict for delegate `name` ("GPU", "NNAPI")."""
    total = nodes + 1 if partial else nodes
    _log(
        f"Replacing {nodes} out of {total} node(s) with delegate ({kernel}) node, yielding 1 partitions for the whole graph.",
        "VERBOSE",
    )
    if name == "GPU":
        _log("Initialized OpenCL-based API.")
        _log("Created 1 GPU delegate kernels.")
    how = "partially executed by the delegate w/ 1 delegate kernels." if partial else "completely executed by the delegate."
    _log(f"Explicitly applied {name} delegate, and the model graph will be {how}")


def _print_gpu_delegate(nodes: int, partial: bool) -> None:
    _log("Created TensorFlow Lite delegate for GPU.")
    _log("GPU delegate created.")
    if partial:
        _log("Following operations are not supported by GPU delegate:", "ERROR")
        _log("CUSTOM: Operation is not supported.", "ERROR")
        _log(f"{nodes} operations will run on the GPU, and the remaining 1 operations will run on the CPU.", "ERROR")
    _print_delegate_verdict("GPU", "TfLiteGpuDelegateV2", nodes, partial)


def _print_nnapi_delegate(nodes: int, accelerator: str, partial: bool) -> None:
    _log(f"NNAPI accelerators available: [{','.join(NNAPI_ACCELERATORS)}]")
    if accelerator and accelerator not in NNAPI_ACCELERATORS:
        _log(f"Could not find the specified NNAPI accelerator: {accelerator}. Must be one of: "
             f"{{{','.join(NNAPI_ACCELERATORS)}}}.", "WARN")
        _log("NNAPI acceleration is unsupported on this platform.", "WARN")
        return
    _log("Created TensorFlow Lite delegate for NNAPI.")
    _log("NNAPI delegate created.")
    _print_delegate_verdict("NNAPI", "TfLiteNnapiDelegate", nodes, partial)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> int:
    start_rss = _max_rss_mb()
    faults = _faults()
    try:
        values, given, unconsumed = _parse_flags(argv)
    except ValueError as e:
        _log("STARTING!")
        _log(f"Failed to parse flag '{e}' against argv", "ERROR")
        _log("Benchmarking failed.", "ERROR")
        return 1
    graph = values["graph"]
    _drop_connection_if_due(faults)
    _log("STARTING!")
    if unconsumed:
        _log(f"Unconsumed cmdline flags: {' '.join(unconsumed)}", "WARN")
    _echo_parameters(values, given)
    if not graph:
        _log("Please specify the name of your TF Lite input file with --graph", "ERROR")
        _log("Benchmarking failed.", "ERROR")
        return 1
    if not os.path.isfile(graph):
        _log(f"Could not open '{graph}'.", "ERROR")
        _log(f"Failed to mmap model {graph}", "ERROR")
        _log("Benchmarking failed.", "ERROR")
        return 1
    _log(f"Loaded model {graph}")
    if _matches(faults, "hang_models", graph):
        _sleep_forever()
    import ai_edge_litert.interpreter  # noqa: F401  (imported before the clock starts)

    t0 = time.perf_counter_ns()
    interpreter = _load(graph, values, given)
    init_us = (time.perf_counter_ns() - t0) // 1000
    init_rss = _max_rss_mb()
    ops = interpreter._get_ops_details()
    if _matches(faults, "crash_models", graph):
        _print_crash(ops[0]["op_name"] if ops else "CONV_2D")
        _count_model_run(faults)
        return _CRASH_EXIT_STATUS
    if values["use_gpu"] and faults.get("gpu_unavailable"):
        _log("GPU acceleration is unsupported on this platform.", "WARN")
    elif values["use_gpu"]:
        _print_gpu_delegate(len(ops), partial=_matches(faults, "partial_gpu_models", graph))
    if values["use_nnapi"]:
        _print_nnapi_delegate(len(ops), values["nnapi_accelerator_name"],
                              partial=_matches(faults, "partial_nnapi_models", graph))
    _log(f"The input model file size (MB): {_fmt(os.path.getsize(graph) / 1024 / 1024)}")
    _log(f"Initialized session in {_fmt(init_us / 1000)}ms.")
    if _matches(faults, "garbage_models", graph):
        _print_garbage(graph)
        _count_model_run(faults)
        return 0
    values = {**values, "slow_factor": _slow_factor(faults), "steady_us": faults.get("steady_us")}
    warmup = _phase(interpreter, values["warmup_runs"], values["warmup_min_secs"], values)
    measured = _phase(interpreter, values["num_runs"], values["min_secs"], values)
    _log(
        f"Inference timings in us: Init: {init_us}, First inference: {warmup[0] if warmup else 0},"
        f" Warmup (avg): {_fmt(_mean(warmup))}, Inference (avg): {_fmt(_mean(measured))}"
    )
    _log(
        "Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE"
        " to the actual memory footprint of the model at runtime. Take the information at your discretion."
    )
    _log(
        f"Memory footprint delta from the start of the tool (MB): init={_fmt(init_rss - start_rss)}"
        f" overall={_fmt(_max_rss_mb() - start_rss)}"
    )
    _count_model_run(faults)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
