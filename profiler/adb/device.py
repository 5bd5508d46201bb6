"""`AdbDevice`: one phone's CPU, GPU or NNAPI, measured with TFLite's `benchmark_model` over ADB.

A phone is reached with adb-shell (TCP, or USB with `adb-shell[usb]`) and RSA auth.  Models
are measured in batches, because a round trip per entry costs more than a small layer:

1. ONE file is pushed: the batch's models in a POSIX (ustar) archive, in measuring order,
   under sanitized names (`m007_conv2d_f32_....tflite`, `profiler.adb.archive`);
2. ONE shell call runs `android_bench/run_batch.sh`, which checks the archive's listing
   (plain files with safe names only), unpacks it inside the batch's directory with one
   `tar`, benchmarks every model and appends a framed record per model (output + exit
   status, since adb's shell service returns none) to the batch's `records.txt`;
3. `records.txt` is pulled and each record becomes a `Measurement` or a
   `MeasurementFailure` (`profiler.adb.records`: crash with its exit status, timeout,
   unreadable output, or a GPU or NNAPI delegate that did not take the whole graph — never
   a latency of that backend).

Batches stay on the phone until they hold `SWEEP_BYTES` (archives and unpacked models),
then the session's earlier batches are removed in one command between two batches: every
removal is file-system work on the phone, kept away from the measurements and done rarely.
The session directory goes when the device is closed.  Ctrl-C during a batch pulls the
records the runner had finished (over a fresh connection) and yields them before the
interrupt goes on, so the caller commits them and a rerun measures only the rest; those
results miss the conditions monitor's reference at the batch's end (stored without one).

`benchmark_model` and the runner are pushed once per session and checked by sha256.  The
median stored in the LUT is benchmark_model's `median=` where the build prints
percentiles, else its average (`avg=`): builds without percentiles print no median.

Faults: a dropped connection is reconnected with exponential backoff and the runner is run
again (`profiler.adb.connection`); it skips the models already measured.  After
`max_consecutive_failures` crashes, timeouts or unreadable outputs in a row the run stops
with `ProfilerError`.  Heat and background apps are the conditions monitor's
(`profiler.monitor`, the same for every device): it ends each batch with its reference
model and measures a drifted batch again after a cool-down; the phone gives it its
devices.toml settings (`monitor_defaults`: `drift_pct`, `drift_pause_s`,
`drift_max_pauses`, `drift_every`) and its battery temperature.

Every remote path is below the configured `remote_dir` and built from sanitized names;
every shell argument is quoted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import re
import secrets
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from lut.table import Measurement, MeasurementFailure
from profiler.adb.archive import batch_archive, remote_name, split_batches
from profiler.adb.connection import CONNECTION_ERRORS, LOG, SETUP_TIMEOUT_S, Connection, RunnerInterrupted, reason
from profiler.adb.phone import BATTERY_COMMAND, FACTS_COMMAND, battery_temp_c, check_abi, parse_phone
from profiler.adb.records import (
    Outcome,
    RunnerRecord,
    error_text,
    parse_runner_records,
    result_from_record,
    runner_script,
)
from profiler.adb.wire import push_files
from profiler.device_config import BACKENDS, AdbSettings, BackendSettings, parse_adb_settings
from profiler.errors import ProfilerError
from profiler.monitor import REFERENCE_ID
from profiler.timing import TimingPolicy

__all__ = ["SWEEP_BYTES", "AdbDevice", "open_adb"]

_HEARTBEAT_S = 10.0  # run_batch.sh prints PHONEFIT_ALIVE this often
_FILE_MODE = 0o100644
_EXEC_MODE = 0o100755
SWEEP_BYTES = 256 * 1024 * 1024  # earlier batches on the phone (archive + models) before they go


class _BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a batch, with what the phone had finished: {entry index: outcome}."""

    def __init__(self, finished: dict[int, Outcome]):
        super().__init__()
        self.finished = finished


@dataclasses.dataclass
class _Batch:
    """One batch on the phone, and how far it got (so a retry goes on where it stopped)."""

    directory: str
    tag: str
    entries: list[tuple[str, bytes, str]]  # (model_id, tflite, remote file name)
    archive: bytes  # the entries' models in one ustar archive, pushed as models/batch.tar
    read_battery: bool  # whether the runner's shell call also reads the battery temperature
    pushed: bool = False


def _cpus(mask: str) -> int:
    return int(mask, 16).bit_count()


# backend -> the settings its `delegate` condition names, in order ("auto": the delegate or NNAPI chooses).
_DELEGATE_CONDITION = {"gpu": ("precision", "gpu_backend"), "nnapi": ("accelerator",)}


def _delegate(backend: str, run: BackendSettings) -> str:
    """The LUT's `delegate` condition: what runs the ops, with the delegate's settings
    (`gpu/fp16/auto`, `gpu/fp32/cl`, `nnapi/auto`, `nnapi/qti-dsp`), so that a LUT is resumed
    only under the same ones."""
    if backend == "cpu":
        off = any(flag in ("--use_xnnpack=false", "--use_xnnpack=0") for flag in run.flags)
        return "none" if off else "xnnpack"
    return "/".join([backend, *(getattr(run, field) or "auto" for field in _DELEGATE_CONDITION[backend])])


class AdbDevice:
    """One phone's CPU, GPU or NNAPI through `benchmark_model` over ADB.  Use `open_device`."""

    def __init__(self, settings: AdbSettings, backend: str = "cpu", threads: int | None = None, *,
                 sleep: Callable[[float], None] = time.sleep):
        if backend not in BACKENDS:
            raise ProfilerError(f"`backend` must be one of {', '.join(BACKENDS)}. Received: backend={backend!r}.")
        run = settings.backend(backend)
        threads = threads if threads is not None else (run.threads or 1)
        if not isinstance(threads, int) or threads < 1:
            raise ProfilerError(f"`threads` must be a positive integer. Received: threads={threads!r}.")
        if run.taskset and threads > _cpus(run.taskset):
            cpus = _cpus(run.taskset)
            raise ProfilerError(
                f"{threads} threads need {threads} CPUs, but [{settings.name}.{backend}] taskset = "
                f"{run.taskset!r} in {settings.source} allows {cpus}. Use --threads {cpus} or a wider mask. "
                f"Received: threads={threads}, taskset={run.taskset!r}."
            )
        self.name, self.backend, self.threads = settings.name, backend, threads
        # the devices.toml group this phone was opened as (`open_device(GROUP)`): its conditions
        # name the group, so a LUT the group built is this phone's too
        self.group: str | None = None
        self._settings, self._run = settings, run
        self._bench = self._read_benchmark_model()
        self._bench_sha = hashlib.sha256(self._bench).hexdigest()
        self._runner = runner_script()
        self._flags = (f"--num_threads={threads}", f"--warmup_runs={run.warmup_runs}", f"--num_runs={run.num_runs}",
                       f"--min_secs={run.min_secs:g}", *run.flags, *run.delegate_flags)
        self._session = f"{settings.remote_dir}/runs/{secrets.token_hex(4)}"
        self._batches = itertools.count()
        self._phone_bytes = 0  # what the session's batches hold on the phone
        self._link = Connection(settings, sleep=sleep)
        self._link.connect_first()
        try:
            self._facts = self._link.retrying(lambda: self._shell(FACTS_COMMAND))
            self._phone = parse_phone(self._facts)
            check_abi(self._bench, self._phone, name=self.name, path=settings.benchmark_model, source=settings.source)
            self._install()
        except BaseException:
            self._link.close()
            raise
        self._battery_before = self._battery_last = battery_temp_c(self._facts)

    @property
    def monitor_every(self) -> int:
        """The conditions monitor's chunk: `drift_every` entries, else a batch with the
        reference model as its last entry."""
        return self._settings.drift_every or max(1, self._settings.batch_size - 1)

    @property
    def monitor_defaults(self) -> dict[str, float]:
        """The conditions monitor's settings this phone's devices.toml gives (the command's
        options override them)."""
        s = self._settings
        return {"tolerance_pct": s.drift_pct, "wait_s": s.drift_pause_s, "max_tries": s.drift_max_pauses + 1}

    def vitals(self) -> dict[str, object]:
        """What the phone says of itself now, for the monitor's record of a disturbed chunk."""
        return {"battery_temp_c": self._battery_last}

    # ------------------------------------------------------------ the protocol
    def conditions(self) -> dict[str, object]:
        return {"device": self.group or self.name, "backend": self.backend, "threads": self.threads,
                "delegate": _delegate(self.backend, self._run), "flags": self._flags_text()}

    def fingerprint(self) -> dict[str, object]:
        phone = self._phone
        battery_now = self._link.retrying(self._read_battery)
        return {
            **{key: phone.get(key) for key in ("model", "manufacturer", "serialno")},
            "soc": phone.get("soc_model") or phone.get("board_platform") or phone.get("hardware"),
            **{key: phone.get(key) for key in ("soc_manufacturer", "board_platform", "android", "sdk", "build", "abi")},
            "cpu_clusters": phone.get("cpu_clusters", []),
            "benchmark_model_sha256": self._bench_sha,
            "benchmark_model_flags": self._flags_text(),
            "runner_sha256": hashlib.sha256(self._runner).hexdigest(),
            "battery_temp_c_before": self._battery_before,
            "battery_temp_c_after": battery_now,
        }

    def measure(self, models: Sequence[tuple[str, bytes]]) -> Iterator[tuple[str, Measurement | MeasurementFailure]]:
        """Measure `models` batch by batch; yield each batch's results once it is pulled."""
        consecutive_faults, last_fault = 0, ""
        for batch in split_batches(models, self._settings.batch_size, int(self._settings.batch_mib * 2**20)):
            try:
                results = self._measure_batch(batch)
            except _BatchInterrupted as interrupted:
                # What the phone finished before Ctrl-C is handed on before the interrupt goes on,
                # so the caller commits it and a rerun measures only the rest.
                for index, (model_id, _) in enumerate(batch):
                    if index in interrupted.finished:
                        yield model_id, interrupted.finished[index][0]
                raise
            for (model_id, _), (result, fault) in zip(batch, results, strict=True):
                yield model_id, result
                if fault and isinstance(result, MeasurementFailure):
                    consecutive_faults, last_fault = consecutive_faults + 1, result.error
                elif isinstance(result, Measurement):
                    consecutive_faults = 0
                if consecutive_faults >= self._settings.max_consecutive_failures:
                    raise ProfilerError(
                        f"{consecutive_faults} models in a row failed on {self.name}; stopping. Last error: "
                        f"{last_fault} Check benchmark_model ({self._settings.benchmark_model}) runs on the phone; "
                        "the failures are recorded, rerun with --retry-failed once fixed."
                    )

    def run_records(self, models: Sequence[tuple[str, bytes]]) -> list[RunnerRecord | None]:
        """`models` run as one batch (at most `batch_size`) by the batch runner: each model's
        record as the runner wrote it, None where it left none.  The text `measure` makes its
        results of, for a caller that reads more of it (`profiler.doctor`: the GPU's and NNAPI's
        delegate verdicts, XNNPACK's line)."""
        if not 0 < len(models) <= self._settings.batch_size:
            raise ValueError(f"`models` must be 1 to batch_size={self._settings.batch_size} models. "
                             f"Received: {len(models)} models.")
        batch = self._new_batch(list(models))
        records = self._link.retrying(lambda: self._run_batch_once(batch))
        return [records.get(name) for _, _, name in batch.entries]

    def close(self) -> None:
        try:
            if self._link.connected:
                self._shell(f"rm -rf {shlex.quote(self._session)}")
        except CONNECTION_ERRORS:
            pass  # the next session clears leftovers of this one
        finally:
            self._link.close()

    # ------------------------------------------------------------ batches
    def _measure_batch(self, entries: list[tuple[str, bytes]]) -> list[Outcome]:
        """Results of `entries` in order. The battery temperature comes with a batch that holds
        the conditions monitor's reference (it shows throttling when the reference drifts)."""
        batch = self._new_batch(entries)
        timeout_s = self._run.model_timeout_s
        try:
            records = self._link.retrying(lambda: self._run_batch_once(batch))
        except KeyboardInterrupt:
            records = self._records_after_interrupt(batch)
            raise _BatchInterrupted({
                index: result_from_record(records[name], self.backend, timeout_s)
                for index, (_, _, name) in enumerate(batch.entries) if name in records
            }) from None
        return [result_from_record(records.get(name), self.backend, timeout_s) for _, _, name in batch.entries]

    def _new_batch(self, entries: list[tuple[str, bytes]]) -> _Batch:
        directory = f"{self._session}/b{next(self._batches):05d}"
        named = [(model_id, data, remote_name(i, model_id)) for i, (model_id, data) in enumerate(entries)]
        read_battery = any(model_id == REFERENCE_ID for model_id, _ in entries)
        return _Batch(directory, secrets.token_hex(6), named, batch_archive(named), read_battery)

    def _records_after_interrupt(self, batch: _Batch) -> dict[str, RunnerRecord]:
        """The records the runner had appended when Ctrl-C came (one per finished model), pulled
        over a fresh connection (the interrupted shell stream cannot be trusted); {} when none
        can be had. The hung-up runner stops, and its model's cut record is ignored."""
        if not batch.pushed:
            return {}
        try:
            self._link.reconnect()
            text = self._pull_records(batch)
        except KeyboardInterrupt:
            return {}  # a second Ctrl-C: the user wants out now
        except Exception as e:  # noqa: BLE001 - best effort: an interrupt must not turn into another error
            LOG.warning("%s: could not pull the interrupted batch's finished records (%s)", self.name, reason(e))
            return {}
        return parse_runner_records(text, batch.tag)

    def _run_batch_once(self, batch: _Batch) -> dict[str, RunnerRecord]:
        """Push the archive unless it is there, run (or resume) the runner, pull the records."""
        if not batch.pushed:
            footprint = 2 * len(batch.archive)  # the archive, and the models unpacked from it
            self._make_room(footprint)
            # The phone makes the batch's directories as the file arrives (adbd's SEND makes parents).
            push_files(self._link.adb, [(f"{batch.directory}/models/batch.tar", batch.archive, _FILE_MODE)],
                       SETUP_TIMEOUT_S)
            batch.pushed = True
            self._phone_bytes += footprint
        # The runner prints a heartbeat every 10 s; the first model of a resumed batch may wait
        # for the old runner's current model, which prints PHONEFIT_WAIT each second.
        silence_limit_s = 6 * _HEARTBEAT_S
        output = self._shell(self._runner_command(batch), silence_s=silence_limit_s)
        self._note_battery(output)
        if "PHONEFIT_ERROR" in output:
            message = output.split("PHONEFIT_ERROR", 1)[1].splitlines()[0].strip()
            raise ProfilerError(f"The batch runner on {self.name} cannot run: {message}.")
        if "PHONEFIT_BATCH_DONE" not in output:
            raise RunnerInterrupted(f"the batch runner stopped early; its last output: {error_text(output)}")
        return parse_runner_records(self._pull_records(batch), batch.tag)

    def _pull_records(self, batch: _Batch) -> str:
        stream = io.BytesIO()
        self._link.adb.pull(f"{batch.directory}/records.txt", stream, transport_timeout_s=SETUP_TIMEOUT_S,
                            read_timeout_s=SETUP_TIMEOUT_S)
        return stream.getvalue().decode("utf-8", "replace")

    def _make_room(self, footprint: int) -> None:
        """Remove the session's earlier batches once they and the next would hold more than
        `SWEEP_BYTES` on the phone: between two batches, never next to a measurement, and
        rarely, since every removal is file-system work on the phone."""
        if self._phone_bytes and self._phone_bytes + footprint > SWEEP_BYTES:
            self._shell(f"rm -rf {shlex.quote(self._session)}/b[0-9]*")
            self._phone_bytes = 0

    def _runner_command(self, batch: _Batch) -> str:
        remote, run = self._settings.remote_dir, self._run
        argv = [
            "sh", f"{remote}/run_batch.sh", batch.directory, f"{remote}/benchmark_model",
            f"{run.model_timeout_s:g}", f"{run.cooldown_s:g}", run.taskset or "-", batch.tag, *self._flags,
        ]
        # The battery temperature after a batch that ends with the monitor's reference comes
        # in this same round trip (a disturbed chunk records it: it shows throttling); other
        # batches skip dumpsys, a costly process.
        battery = f"; {BATTERY_COMMAND}" if batch.read_battery else ""
        return " ".join(map(shlex.quote, argv)) + battery

    # ------------------------------------------------------------ setup
    def _shell(self, command: str, *, silence_s: float | None = None) -> str:
        """`command`'s output; `silence_s`: how long it may print nothing (else adb-shell's read timeout)."""
        if silence_s is None:
            output: str = self._link.adb.shell(command, transport_timeout_s=SETUP_TIMEOUT_S)
        else:
            output = self._link.adb.shell(command, transport_timeout_s=silence_s, read_timeout_s=silence_s)
        return output

    def _read_benchmark_model(self) -> bytes:
        path = self._settings.benchmark_model
        try:
            return path.read_bytes()
        except OSError as e:
            raise ProfilerError(
                f"{self._settings.source}: [{self.name}] `benchmark_model` must be the local path of TFLite's "
                f"benchmark_model built for the phone. Received: benchmark_model={str(path)!r} ({e.strerror}). "
                "android_bench/README.md says how to get it."
            ) from e

    def _flags_text(self) -> str:
        pinned = f" (taskset {self._run.taskset})" if self._run.taskset else ""
        return " ".join(self._flags) + pinned

    def _install(self) -> None:
        """Push benchmark_model and the runner unless the phone has them already (by sha256)."""
        remote = self._settings.remote_dir
        files = {f"{remote}/benchmark_model": (self._bench, _EXEC_MODE), f"{remote}/run_batch.sh": (self._runner, _FILE_MODE)}

        def install() -> None:
            stale = self._stale_files(files)
            for path in stale:
                data, mode = files[path]
                self._link.adb.push(io.BytesIO(data), path, st_mode=mode, transport_timeout_s=SETUP_TIMEOUT_S,
                                    read_timeout_s=SETUP_TIMEOUT_S)
            if stale:
                self._shell(f"chmod 755 {shlex.quote(remote + '/benchmark_model')}")
                still = self._stale_files(files)
                if still:
                    raise ProfilerError(
                        f"Pushed {', '.join(still)} to {self.name}, but the phone reports other sha256 sums; "
                        "is its storage full?"
                    )

        self._link.retrying(install)

    def _stale_files(self, files: Mapping[str, tuple[bytes, int]]) -> list[str]:
        q = shlex.quote
        paths = " ".join(q(p) for p in files)
        # Old sessions' batches go first: one phonefit per phone, and leftovers are large.
        output = self._shell(
            f"rm -rf {q(self._settings.remote_dir + '/runs')}; mkdir -p {q(self._session)} && "
            f"sha256sum {paths} 2>/dev/null; true"
        )
        found = {}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
                found[parts[1]] = parts[0]
        return [path for path, (data, _) in files.items() if found.get(path) != hashlib.sha256(data).hexdigest()]

    def _read_battery(self) -> float | None:
        self._note_battery(self._shell(BATTERY_COMMAND))
        return self._battery_last

    def _note_battery(self, output: str) -> None:
        temperature = battery_temp_c(output)
        if temperature is not None:
            self._battery_last = temperature


def open_adb(name: str, config: Mapping[str, object], backend: str, threads: int | None, *,
             timing: TimingPolicy | None = None) -> AdbDevice:
    """The registry's factory of the `adb` kind (`profiler.devices.open_device`).

    Args:
        name: the phone's name in devices.toml.
        config: its entry: `{"settings": AdbSettings}` as `load_device_configs` reads it, or
            the raw table.
        backend: "cpu", "gpu" or "nnapi".
        threads: benchmark_model's threads (None: the backend's `threads` in devices.toml, else 1).
        timing: not used: a phone times models with benchmark_model as its devices.toml says.
    """
    settings = config.get("settings")
    if not isinstance(settings, AdbSettings):
        settings = parse_adb_settings(name, config)
    return AdbDevice(settings, backend, threads)
