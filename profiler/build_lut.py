"""Build a per-layer latency lookup table (LUT) for a model on a device.

    python -m profiler.build_lut --device host --model mobilenet_v1 --alpha 0.5 \\
        --resolution 128 --step 8 --out luts/host-cpu-1t.sqlite

Every spec the model can have after filter pruning (on the --step channel grid) gets a
single-op .tflite, measured on the device in two passes over the LUT (`--passes`), each
entry keeping its lower measurement; each result is committed to the SQLite LUT as it
arrives, so an interrupted run is resumed by running the same command again.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

from lut.cli import ArgumentParser, check_output_file, positive_float, positive_int, quiet_litert_notice, run_command
from lut.latency import CONTEXT_META_KEY, CacheContext, LatencyEstimator
from lut.models import load_model
from lut.quiet_tf import import_tensorflow_quietly
from lut.spec import DTYPES, LayerSpec
from lut.table import LatencyTable, Measurement, MeasurementFailure, on_quiet_scale
from profiler.cluster import ClusterConfig, open_cluster
from profiler.context import measure_cache_context
from profiler.convert import keras_to_tflite
from profiler.device_config import BACKENDS, load_device_groups
from profiler.devices import Device, open_device
from profiler.errors import ProfilerError
from profiler.farm import PhoneFarm
from profiler.monitor import REFERENCE_NAME, ConditionsMonitor, MonitorPolicy, add_monitor_arguments, monitor_policy
from profiler.plan import plan_specs
from profiler.single_op import SingleOpFactory

__all__ = [
    "BuildSummary",
    "InvokeOverhead",
    "add_build_arguments",
    "build_lut",
    "build_luts",
    "check_build_outputs",
    "default_lut_path",
    "main",
    "measure_invoke_overhead",
    "open_lut",
]

# The trivial op, alone and in a chain of CHAIN_OPS, gives an invocation's cost: a 1×1 convolution of
# one channel (a RESHAPE, measured 0.36 µs against 0.38–0.40 for trivial convolutions and adds here,
# is no stand-in for the delegate's ops: over the 30 ops of a MobileNet it made small models 5% slower
# by the LUT than measured).
OVERHEAD_SPEC = LayerSpec("conv2d", 1, 1, 1, 1)
OVERHEAD_REPEATS = 5
OVERHEAD_REFERENCE_KEY = "invoke_overhead_reference_us"  # the slowest reference measured with the overhead
OVERHEAD_PARTS_KEY = "invoke_overhead_parts"  # its InvokeOverhead: the trivial op alone and chained, and the passes
CHAIN_OPS = 64  # trivial ops in the chain whose slope is one op's own cost inside a model
RATE_META_KEY = "seconds_per_entry"  # the last build's pace, for the expected time of the next one
RATE_SAMPLE = 20  # entries a build must measure for its pace to count
DRIFT_PASSES = 3  # passes over the entries whose reference drifted off a quiet value lowered during the build
# Each entry is the lower of this many measurements, taken in separate passes over the LUT (the second in the
# reverse order): a slowdown the reference model does not see is in at most one of them. Measured on an Intel
# Ice Lake VM (2026-12-07): 9% of a MobileNetV2 32 px build's entries at 1.3-2.1x another build's, the reference
# within its tolerance, each back at the other build's value when measured again; whole models, the median of
# interleaved rounds, do not carry such a slowdown, so the LUT was +20% over small prunings.
PASSES = 2


@dataclasses.dataclass
class BuildSummary:
    """What one `build_lut` run did, and where its time went."""

    planned: int = 0
    reused: int = 0
    measured: int = 0
    remeasured: int = 0  # entries measured again: their reference drifted off the quiet value lowered since
    confirmed: int = 0  # entries measured in another pass (`PASSES`), of which `lowered` came out lower
    lowered: int = 0
    slope: float | None = None  # how far the entries moved with the reference (`LatencyTable.reference_slope`)
    failed: int = 0
    generate_s: float = 0.0
    measure_s: float = 0.0
    total_s: float = 0.0
    monitor: dict[str, Any] | None = None

    def __str__(self) -> str:
        rate = (self.measured + self.confirmed) / self.total_s * 60 if self.total_s else 0.0
        conditions = ""
        if self.monitor and self.monitor.get("checks"):
            m = self.monitor
            others = "" if m.get("max_others_cores") is None else f", other processes up to {m['max_others_cores']:.1f} cores"
            conditions = (f"; reference within {m['max_abs_drift_pct']:.1f}% of its quiet {m['quiet_us']:.1f} µs over "
                          f"{m['checks']} checks, {m['disturbed']} disturbed chunks measured again{others}")
        again = f" ({self.remeasured} of them again)" if self.remeasured else ""
        confirmed = (f", {self.confirmed} measured in a second pass ({self.lowered} of them lower)" if self.confirmed
                     else "")
        if self.monitor:
            conditions += ("; the reference moved too little between passes to tell how far entries move with it"
                           if self.slope is None else f"; entries moved {self.slope:.2f}× the reference between passes (counted at 1×)")
        return (
            f"{self.planned} entries planned: {self.measured} measured{again}, {self.reused} reused, "
            f"{self.failed} failed{confirmed} in {self.total_s:.1f} s ({rate:.0f} entries/min; "
            f"generating {self.generate_s:.1f} s, measuring {self.measure_s:.1f} s){conditions}"
        )


def default_lut_path(device: str, backend: str, threads: object, dtype: str = "float32") -> str:
    name = f"{device}-cpu-{threads}t" if backend == "cpu" else f"{device}-{backend}"  # a delegate runs the graph
    return f"luts/{name}.sqlite" if dtype == "float32" else f"luts/{name}-{dtype}.sqlite"


def _timed_models(specs: Sequence[LayerSpec], summary: BuildSummary) -> Iterator[tuple[str, bytes]]:
    """Single-op models generated lazily, the time spent generating them added to `summary`."""
    factory = SingleOpFactory()
    for spec in specs:
        start = time.perf_counter()
        model = factory.build(spec)
        summary.generate_s += time.perf_counter() - start
        yield spec.key, model


def open_lut(path: str | os.PathLike[str], device: Device, step: int, dtype: str = "float32") -> LatencyTable:
    """The LUT at `path` for measuring `dtype` ops on `device` on a `step` channel grid: created with
    the device's conditions, fingerprint and step, or opened to resume (same conditions only)."""
    conditions = {**device.conditions(), "dtype": dtype}
    return LatencyTable.create(path, {**conditions, "fingerprint": device.fingerprint(), "step": step})


def _trivial_chain(ops: int) -> bytes:
    """`ops` of the trivial op (OVERHEAD_SPEC: a 1×1 convolution of one channel) in a row, one model."""
    import keras

    inputs = x = keras.Input((1, 1, 1))
    for _ in range(ops):
        x = keras.layers.Conv2D(1, 1)(x)
    return keras_to_tflite(keras.Model(inputs, x))


@dataclasses.dataclass(frozen=True)
class InvokeOverhead:
    """What one invocation costs on a device beyond its ops: the intercept of a line through the
    trivial op (OVERHEAD_SPEC) alone, `alone_us`, and `CHAIN_OPS` of it in one model, `chain_us`:
    T1 − (TN − T1) / (N − 1), each on the quiet scale, the lowest of `passes` measurements.
    (The trivial op alone is not the overhead: it holds its own cost inside a model too, 0.034
    µs of 0.46 here, which over the 67 ops of a MobileNetV2 made the LUT 10% too fast at 32 px.
    Measured unmonitored at the start of a build on a slow VM it came out 0.74 µs against 0.41,
    and the LUT missed 30 prunings of MobileNetV1 at 32 px by −35%.)"""

    alone_us: float
    chain_us: float
    passes: int = 1

    @property
    def us(self) -> float:
        return max(self.alone_us - max(self.chain_us - self.alone_us, 0.0) / (CHAIN_OPS - 1), 0.0)

    def lower(self, other: InvokeOverhead) -> InvokeOverhead:
        """The two passes in one: each part the lower (load only ever adds time)."""
        return InvokeOverhead(min(self.alone_us, other.alone_us), min(self.chain_us, other.chain_us),
                              self.passes + other.passes)


def measure_invoke_overhead(device: Device, monitor: ConditionsMonitor | None = None,
                            repeats: int = OVERHEAD_REPEATS) -> tuple[InvokeOverhead, float | None]:
    """One pass of `device`'s invocation overhead, and the slowest reference measured with it
    (None without `monitor`): the trivial op alone and chained, each the median of `repeats`
    interleaved measurements taken through `monitor` and on its quiet scale, as the entries are."""
    single, chain = SingleOpFactory().build(OVERHEAD_SPEC), _trivial_chain(CHAIN_OPS)
    items = [item for i in range(repeats) for item in ((f"single{i}", single), (f"chain{i}", chain))]
    results = list(_measured(device, monitor, items))
    failure = next((r.error for _, r, _ in results if isinstance(r, MeasurementFailure)), None)
    if failure is not None:
        raise ProfilerError(f"{device.name} could not run the trivial model {OVERHEAD_SPEC.key} (alone or "
                            f"{CHAIN_OPS} in a row): {failure}")
    quiet = None if monitor is None else monitor.quiet_us
    scaled = {name: on_quiet_scale(r.median_us, reference, quiet)  # type: ignore[union-attr]
              for name, r, reference in results}
    alone = statistics.median(us for name, us in scaled.items() if name.startswith("single"))
    chained = statistics.median(us for name, us in scaled.items() if name.startswith("chain"))
    references = [reference for _, _, reference in results if reference is not None]
    return InvokeOverhead(alone, chained), max(references, default=None)


def open_monitor(device: Device, table: LatencyTable, policy: MonitorPolicy | None,
                 log: Callable[[str], None] | None = None) -> ConditionsMonitor | None:
    """The conditions monitor for measuring into `table` (None without a policy): the
    reference's quiet value is the LUT's, measured now when the LUT has none."""
    if policy is None:
        return None
    load = device.load_probe() if hasattr(device, "load_probe") else None
    quiet = table.quiet_us
    monitor = ConditionsMonitor(device, policy, quiet_us=quiet, load=load, log=log)
    if quiet is None:
        table.set_meta({"reference_us": monitor.quiet_us, "reference_model": REFERENCE_NAME})
    return monitor


def _measured(
    device: Device, monitor: ConditionsMonitor | None, models: Iterable[tuple[str, bytes]]
) -> Iterator[tuple[str, Measurement | MeasurementFailure, float | None]]:
    if monitor is None:
        # devices stream their input (Device.measure says Sequence; the profiler branch types it Iterable)
        return ((model_id, result, None) for model_id, result in device.measure(models))  # type: ignore[arg-type]
    return monitor.measure(models)


def _entries_measured(
    device: Device, monitor: ConditionsMonitor | None, models: Iterable[tuple[str, bytes]]
) -> Iterator[tuple[str, Measurement | MeasurementFailure, float | None, str]]:
    """`(model_id, result, reference_us, measured_by)` for every model: sharded over the phones of
    a farm (`profiler.farm.PhoneFarm.measure_shards`), else through the monitor on `device`."""
    if isinstance(device, PhoneFarm):
        return device.measure_shards(models)
    return ((model_id, result, reference, device.name) for model_id, result, reference in _measured(device, monitor, models))


def build_lut(
    device: Device,
    specs: Iterable[LayerSpec],
    table: LatencyTable,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    policy: MonitorPolicy | None = MonitorPolicy(),
    log: Callable[[str], None] | None = None,
    passes: int = PASSES,
) -> BuildSummary:
    """Measure on `device` every spec of `specs` that `table` lacks, committing each result.

    Also measures the device's per-invocation overhead into the LUT's metadata, in as many
    passes as the entries (`InvokeOverhead.lower`): a resumed or extended LUT keeps the value
    its first entries were measured with, so its estimates stay comparable. With a monitor
    `policy`, entries are kept only when the conditions monitor finds the device quiet around them (`profiler.monitor`; a device
    that stays disturbed raises `DriftError`, what was measured before stays), and each
    stores the reference's value. Records the device fingerprint and what the monitor saw.
    Each entry is the lower of `passes` measurements taken in separate passes over the specs
    (`PASSES`); a rerun takes the passes an entry lacks, and a LUT of before them gets them.

    A `PhoneFarm` (a devices.toml group) measures the entries on all its phones, each with its
    own monitor judged against the group's reference (its `policy` is the farm's); every row
    names the phone that measured it, and the progress bar shows each phone's pace.
    """
    start = time.perf_counter()
    say = log or (lambda message: tqdm.write(message, file=sys.stderr))
    if isinstance(device, PhoneFarm):  # each phone's own monitor, judged against the group's reference
        quiet = device.start(table.quiet_us)
        if quiet is not None:
            table.set_meta({"reference_us": quiet, "reference_model": REFERENCE_NAME})
        monitor = None
    else:
        monitor = open_monitor(device, table, policy, say)
    specs = list(dict.fromkeys(specs))
    done = table.keys(include_failed=not retry_failed) - _drifted(table, monitor)
    todo = [spec for spec in specs if spec.key not in done]
    summary = BuildSummary(planned=len(specs), reused=len(specs) - len(todo))
    rate = table.meta.get(RATE_META_KEY)
    if todo and rate is not None:
        say(f"{len(todo)} entries to measure: about {_duration(len(todo) * float(rate))} at this LUT's last rate "
            f"({60 / float(rate):.0f} entries/min)")
    bar = tqdm(total=len(todo), unit="entry", desc=f"measuring on {device.name}", disable=not progress, smoothing=0.05)
    try:
        _measure_into(table, device, monitor, todo, summary, bar)
        if monitor is not None:
            _measure_drifted_again(table, device, monitor, specs, summary, bar, say)
        _measure_overhead(table, device, monitor, 1)
        _measure_in_more_passes(table, device, monitor, specs, passes, summary, bar, say)
        if monitor is not None and todo:
            monitor.check()  # the session's end
    finally:
        bar.close()
        summary.total_s = time.perf_counter() - start
        if monitor is not None:
            summary.monitor = monitor.summary()
            table.set_meta({"monitor": summary.monitor, "reference_us": monitor.quiet_us})
        elif isinstance(device, PhoneFarm):
            summary.monitor = device.monitor_summary()
            table.set_meta({"monitor": summary.monitor})
    table.set_meta({"fingerprint": device.fingerprint()})
    summary.slope = table.reference_slope()
    if summary.measured >= RATE_SAMPLE:
        table.set_meta({RATE_META_KEY: summary.total_s / summary.measured})
    return summary


def _drift_limit_us(monitor: ConditionsMonitor) -> float:
    """The slowest reference the monitor trusts now: its quiet value plus the tolerance."""
    return monitor.quiet_us * (1 + monitor.policy.tolerance_pct / 100)


def _drifted(table: LatencyTable, monitor: ConditionsMonitor | None) -> set[str]:
    """Entries kept while the reference ran slower than the monitor trusts now."""
    return set() if monitor is None else table.drifted(_drift_limit_us(monitor))


def _measure_overhead(table: LatencyTable, device: Device, monitor: ConditionsMonitor | None, passes: int) -> None:
    """The LUT's invocation overhead (`InvokeOverhead`) in `passes` passes, each measured after
    that pass's entries (the quiet value has then seen them) and kept part by part where lower;
    measured anew when it was measured over the tolerance of the quiet value. A LUT of before
    the passes keeps its overhead, as a resumed or extended LUT does."""
    meta = table.meta
    stored = meta.get(OVERHEAD_REFERENCE_KEY)
    drifted = monitor is not None and stored is not None and float(stored) > _drift_limit_us(monitor)
    parts = None if drifted or OVERHEAD_PARTS_KEY not in meta else InvokeOverhead(**json.loads(meta[OVERHEAD_PARTS_KEY]))
    if not drifted and "invoke_overhead_us" in meta and (parts is None or parts.passes >= passes):
        return
    measured, reference = measure_invoke_overhead(device, monitor)
    parts = measured if parts is None else parts.lower(measured)
    references = [float(r) for r in (None if drifted else stored, reference) if r is not None]
    table.set_meta({"invoke_overhead_us": parts.us, OVERHEAD_PARTS_KEY: dataclasses.asdict(parts),
                    **({OVERHEAD_REFERENCE_KEY: max(references)} if references else {})})


def _measure_drifted_again(table: LatencyTable, device: Device, monitor: ConditionsMonitor, specs: Sequence[LayerSpec],
                           summary: BuildSummary, bar: tqdm, say: Callable[[str], None]) -> None:
    """Measure again the entries of `specs` kept while the reference ran over the tolerance of
    the quiet value as it is now: the monitor lowers that value when the device turns out faster
    than it was (`ConditionsMonitor._lower_quiet`), and what it kept before was then measured on
    a slower device. At most `DRIFT_PASSES` passes; what is left a rerun measures."""
    for _ in range(DRIFT_PASSES):
        drifted = _drifted(table, monitor)
        again = [spec for spec in specs if spec.key in drifted]
        if not again:
            return
        say(f"measuring again what was kept while the reference ran over {_drift_limit_us(monitor):.1f} µs "
            f"(+{monitor.policy.tolerance_pct:g}% "
            f"of its quiet value, lowered to {monitor.quiet_us:.1f} µs since): {len(again)} of {len(specs)} entries")
        summary.remeasured += len(again)
        bar.total += len(again)
        bar.refresh()
        _measure_into(table, device, monitor, again, summary, bar)
    if left := [spec for spec in specs if spec.key in _drifted(table, monitor)]:
        say(f"{len(left)} of {len(specs)} entries still measured over the tolerance after {DRIFT_PASSES} passes: "
            "the same command measures them again")


def _measure_in_more_passes(table: LatencyTable, device: Device, monitor: ConditionsMonitor | None,
                            specs: Sequence[LayerSpec], passes: int, summary: BuildSummary, bar: tqdm,
                            say: Callable[[str], None]) -> None:
    """Measure the entries of `specs` again, in the reverse order, until each is the lower of
    `passes` measurements (`LatencyTable.record_pass`); the invocation overhead after each pass."""
    for done in range(1, passes):
        fewer = table.unconfirmed(done + 1)
        if again := [spec for spec in reversed(specs) if spec.key in fewer]:
            say(f"measuring {len(again)} of {len(specs)} entries in pass {done + 1} of {passes}: each keeps the "
                "lower measurement (a slowdown the reference does not see is in one pass, not in all)")
            before = table.latencies_us(as_measured=True)
            bar.total += len(again)
            bar.refresh()
            _measure_into(table, device, monitor, again, summary, bar, another_pass=True)
            after = table.latencies_us(as_measured=True)
            summary.confirmed += len(again)
            summary.lowered += sum(after.get(spec, 0.0) < before.get(spec, 0.0) for spec in again)
        _measure_overhead(table, device, monitor, done + 1)


def _measure_into(table: LatencyTable, device: Device, monitor: ConditionsMonitor | None,
                  specs: Sequence[LayerSpec], summary: BuildSummary, bar: tqdm, another_pass: bool = False) -> None:
    """Measure `specs` on `device` (through `monitor`), committing each result as it arrives (in
    `another_pass`, as `LatencyTable.record_pass` keeps it; `summary` counts the first passes)."""
    record = table.record_pass if another_pass else table.record
    by_key = {spec.key: spec for spec in specs}
    results = _entries_measured(device, monitor, _timed_models(specs, summary))
    while True:
        measure_start, generate_before = time.perf_counter(), summary.generate_s
        try:
            key, result, reference_us, measured_by = next(results)
        except StopIteration:
            break
        summary.measure_s += time.perf_counter() - measure_start - (summary.generate_s - generate_before)
        record(by_key[key], result, reference_us, measured_by)
        if not another_pass:
            summary.failed += isinstance(result, MeasurementFailure)
            summary.measured += not isinstance(result, MeasurementFailure)
        if isinstance(device, PhoneFarm):
            bar.set_postfix_str(" · ".join(f"{name} {rate:.0f}/min" for name, rate in device.rates().items()),
                                refresh=False)
        elif monitor is not None and monitor.checks:
            bar.set_postfix_str(monitor.checks[-1].describe().replace(" of its quiet", ""), refresh=False)
        bar.update()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def calibrate_cache_context(device: Device, table: LatencyTable, *, policy: MonitorPolicy | None = MonitorPolicy(),
                            log: Callable[[str], None] = print) -> CacheContext:
    """The device's cache context (`profiler.context`), measured into the LUT once."""
    estimator = LatencyEstimator(table)
    if estimator.context is not None:
        return estimator.context
    monitor = open_monitor(device, table, policy, log)

    def measure(items: Sequence[tuple[str, bytes]]) -> Iterator[tuple[str, Measurement | MeasurementFailure]]:
        return ((model_id, result) for model_id, result, _ in _measured(device, monitor, items))

    log(f"measuring {device.name}'s cache: what a model pays for weights that do not stay in it")
    context = measure_cache_context(measure, estimator.invoke_overhead_us)
    # what was measured; the rest of the shape is the estimator's rule, as interpolation is
    table.set_meta({CONTEXT_META_KEY: {"fetch_ns_per_byte": context.fetch_ns_per_byte, "cache_bytes": context.cache_bytes,
                                       "ramp": [list(point) for point in context.ramp]}})
    ramp = ", ".join(f"{share:.2f} at {size / 2**20:.2f} MiB" for size, share in context.ramp if 0 < share < 1)
    log(f"cache context: {context.cache_bytes / 2**20:.2f} MiB effective, {context.fetch_ns_per_byte:.4f} ns per "
        "byte fetched" + (f" (the share of it paid: {ramp})" if ramp else ""))
    return context


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """What a LUT build is measured on and written to (every option but the models')."""
    parser.add_argument("--device", default="host",
                        help="device name: 'host' (this CPU), a phone of devices.toml, or a group of phones there "
                             "([groups.NAME]: all of them build the one LUT, each driven by a Ray actor)")
    parser.add_argument("--devices", metavar="FILE",
                        help="devices.toml registry (default: ./devices.toml, then ~/.config/phonefit/devices.toml)")
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="cpu",
                        help="which processor of the device to measure: cpu, gpu (the GPU delegate) or nnapi (Android's "
                             "NNAPI: a DSP or NPU, as devices.toml's [NAME.nnapi] picks); 'both' writes one LUT each for "
                             "cpu and gpu (nnapi, which many phones delegate only in part, is measured when asked)")
    parser.add_argument("--step", type=positive_int,
                        help="channel grid step (default: 8 on CPU and NNAPI, 4 on GPU, whose delegate works in 4-channel slices)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="what the ops compute in: float32, or int8 as a full-integer model runs them (XNNPACK's "
                             "int8 kernels; one QUANTIZE of the input and one DEQUANTIZE of the output per model)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: the device's setting in devices.toml, 1 on the host)")
    parser.add_argument("--out", help="LUT file (default: luts/DEVICE-cpu-Nt.sqlite, luts/DEVICE-gpu.sqlite or "
                                      "luts/DEVICE-nnapi.sqlite)")
    parser.add_argument("--retry-failed", action="store_true", help="measure again the entries that failed before")
    parser.add_argument("--passes", type=positive_int, default=PASSES,
                        help="measure every entry in this many passes over the LUT and keep its lowest: a slowdown "
                             "the reference model does not see is in one pass, not in all (default: %(default)s)")
    parser.add_argument("--csv", metavar="FILE", help="also export the LUT as CSV (its folder is created)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ray-address", help="with a group of phones: the Ray cluster whose nodes they are attached to "
                                              "(e.g. auto; default: a local cluster started and stopped here)")
    parser.add_argument("--rates", action="store_true",
                        help="with a group of phones: say each phone's entries per minute whenever a batch finishes")
    add_monitor_arguments(parser)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m profiler.build_lut",
        description=__doc__.split("\n\n")[0].rstrip(".") + ". Resumable: rerun the same command to finish an interrupted run.",
    )
    parser.add_argument("--model", action="append", metavar="NAME|FILE.keras",
                        help="mobilenet_v1, mobilenet_v2 or a .keras file; repeat to cover several models in one LUT "
                             "(default: mobilenet_v1)")
    parser.add_argument("--alpha", type=positive_float, default=1.0, help="width multiplier of named models")
    parser.add_argument("--resolution", type=positive_int, default=224, help="input size of named models (pixels)")
    parser.add_argument("--classes", type=positive_int, default=1000, help="classes of named models")
    add_build_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    return run_command(
        "python -m profiler.build_lut", lambda: _main(args),
        on_interrupt="every entry measured so far is saved; run the same command to resume",
    )


def _main(args: argparse.Namespace) -> int:
    check_build_outputs(args)
    import_tensorflow_quietly()
    quiet_litert_notice()
    models = [
        load_model(name, alpha=args.alpha, resolution=args.resolution, classes=args.classes)
        for name in args.model or ["mobilenet_v1"]
    ]
    return build_luts(args, models)


def check_build_outputs(args: argparse.Namespace) -> None:
    """The output options of `add_build_arguments`, checked before any measuring."""
    if args.out and args.backend == "both":
        raise ProfilerError("--out names one file; with --backend both the LUTs get their default names. "
                            "Leave out --out, or measure one backend.")
    for path, option in ((args.out, "--out"), (args.csv, "--csv")):
        if path:
            check_output_file(path, option)  # before hours of measuring, not after


def build_luts(args: argparse.Namespace, models: Sequence[Any]) -> int:
    """Plan `models`' entries on the grid and measure them as `args` (`add_build_arguments`) say:
    one LUT per backend, then its cache context. A devices.toml group is measured by all its
    phones at once (`profiler.farm`), on the Ray cluster at --ray-address or a local one."""
    backends = ("cpu", "gpu") if args.backend == "both" else (args.backend,)
    groups = load_device_groups(args.devices) if args.device != "host" else {}
    policy = monitor_policy(args)
    with open_cluster(ClusterConfig(address=args.ray_address)) if args.device in groups else contextlib.nullcontext():
        for backend in backends:
            step = args.step if args.step is not None else (4 if backend == "gpu" else 8)
            specs = plan_specs(models, step, args.dtype)
            device: Device
            if args.device in groups:
                device = PhoneFarm(args.device, groups[args.device], backend=backend, threads=args.threads,
                                   devices_file=args.devices, policy=policy,
                                   log=lambda message: print(message, file=sys.stderr), show_rates=args.rates)
            else:
                device = open_device(args.device, backend=backend, threads=args.threads, devices_file=args.devices)
            try:
                out = args.out or default_lut_path(args.device, backend, device.conditions()["threads"], args.dtype)
                check_output_file(out, "--out")
                with open_lut(out, device, step, args.dtype) as table:
                    def log(message: str, out: str = out) -> None:
                        print(f"{out}: {message}", file=sys.stderr)

                    print(f"{out}: {len(specs)} entries for {', '.join(m.name for m in models)} on {args.device} "
                          f"({backend})", file=sys.stderr)
                    summary = build_lut(device, specs, table, retry_failed=args.retry_failed,
                                        progress=not args.no_progress, policy=policy, passes=args.passes)
                    print(f"{out}: {summary}")
                    calibrate_cache_context(device, table, policy=policy, log=log)
                    if args.csv:
                        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
                        table.to_csv(args.csv)
            finally:
                device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
