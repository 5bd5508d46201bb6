"""Android phones over ADB: `AdbDevice` measures single-op models with TFLite's `benchmark_model`.

A phone is reached with adb-shell (TCP, or USB with `adb-shell[usb]`) and RSA auth.  Models
are measured in batches, because a round trip per entry costs more than a 50 µs layer:

1. ONE file is pushed: the batch's models in a POSIX (ustar) archive, in measuring order,
   under sanitized names (`m007_conv2d_f32_....tflite`).  A file per model would cost the
   phone's answer to each file, a round trip per model;
2. ONE shell call runs `android_bench/run_batch.sh`, which checks the archive's listing
   (plain files with safe names only), unpacks it inside the batch's directory with one
   `tar`, benchmarks every model and appends a framed record per model (output + exit
   status, since adb's shell service returns none) to the batch's `records.txt`;
3. `records.txt` is pulled and each record becomes a `Measurement` or a
   `MeasurementFailure` (crash with its exit status, timeout, unreadable output, or a GPU
   delegate that did not take the whole graph — never a GPU latency).

Batches stay on the phone until they hold `_SWEEP_BYTES` (archives and unpacked models),
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
again; it skips the models already measured.  After `max_consecutive_failures` crashes,
timeouts or unreadable outputs in a row the run stops with `ProfilerError`.  Heat and
background apps are the conditions monitor's (`profiler.monitor`, the same for every device):
it ends each batch with its reference model and measures a drifted batch again after a
cool-down; the phone gives it its devices.toml settings (`monitor_defaults`: `drift_pct`,
`drift_pause_s`, `drift_max_pauses`, `drift_every`) and its battery temperature.

Every remote path is below the configured `remote_dir` and built from sanitized names;
every shell argument is quoted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import logging
import re
import secrets
import shlex
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib import resources

import numpy as np

from lut.spec import LutError
from lut.table import Measurement, MeasurementFailure
from profiler.benchmark_output import BenchmarkOutputError, parse_benchmark_output
from profiler.device_config import AdbSettings, ensure_adb_key, parse_adb_settings
from profiler.errors import ProfilerError
from profiler.monitor import REFERENCE_ID

__all__ = ["AdbDevice", "RunnerRecord", "open_adb", "parse_runner_records", "runner_script"]

_LOG = logging.getLogger("phonefit.adb")
_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_REMOTE_PART_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_RECORD_RE = re.compile(r"^PHONEFIT_(BEGIN|END) (\S+) (\S+)(?: (-?\d+))?$")
_TIMEOUT_STATUSES = (124, 137)  # timeout's own status; 137 = SIGKILL after the grace period
_HEARTBEAT_S = 10.0  # run_batch.sh prints PHONEFIT_ALIVE this often
_REFERENCE = "reference"
_FILE_MODE = 0o100644
_EXEC_MODE = 0o100755
_SETUP_TIMEOUT_S = 60.0
_SYNC_DATA_MAX = 64 * 1024  # the largest DATA chunk of adb's sync protocol
_TAR_BLOCK = 512
_SWEEP_BYTES = 256 * 1024 * 1024  # earlier batches on the phone (archive + models) before they go
# ELF e_machine -> the Android ABIs that run it.
_ELF_MACHINES = {0xB7: ("arm64-v8a",), 0x28: ("armeabi-v7a", "armeabi"), 0x3E: ("x86_64",), 0x03: ("x86",)}
_PROPS = {
    "model": "ro.product.model",
    "manufacturer": "ro.product.manufacturer",
    "serialno": "ro.serialno",
    "soc_manufacturer": "ro.soc.manufacturer",
    "soc_model": "ro.soc.model",
    "board_platform": "ro.board.platform",
    "hardware": "ro.hardware",
    "android": "ro.build.version.release",
    "sdk": "ro.build.version.sdk",
    "build": "ro.build.fingerprint",
    "abi": "ro.product.cpu.abi",
    "abilist": "ro.product.cpu.abilist",
}


class _RunnerInterrupted(Exception):
    """The runner's shell ended without finishing the batch (the phone killed it)."""


class _BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a batch, with what the phone had finished: {entry index: (result, fault)}."""

    def __init__(self, finished: dict[int, tuple[object, bool]]):
        super().__init__()
        self.finished = finished


def _connection_errors() -> tuple[type[BaseException], ...]:
    from adb_shell import exceptions as e

    return (
        OSError,
        _RunnerInterrupted,
        e.AdbConnectionError,
        e.AdbTimeoutError,
        e.TcpTimeoutException,
        e.InvalidResponseError,
        e.InvalidChecksumError,
        e.InvalidCommandError,
        e.UsbReadFailedError,
        e.UsbWriteFailedError,
        e.UsbDeviceNotFoundError,
    )


def runner_script() -> bytes:
    """The bytes of `android_bench/run_batch.sh`, the batch runner pushed to the phone."""
    return resources.files("android_bench").joinpath("run_batch.sh").read_bytes()


# ---------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class RunnerRecord:
    """One model's record in `records.txt`: benchmark_model's exit status and output."""

    status: int
    output: str


def parse_runner_records(text: str, tag: str) -> dict[str, RunnerRecord]:
    """The complete records of `records.txt` whose markers carry `tag`, by model file name.

    A record cut off by a dropped connection (BEGIN without END) is ignored; a model
    measured again after a reconnect keeps its last complete record.
    """
    records: dict[str, RunnerRecord] = {}
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        match = _RECORD_RE.match(line)
        if not match or match.group(2) != tag:
            if current is not None:
                lines.append(line)
            continue
        kind, name, status = match.group(1), match.group(3), match.group(4)
        if kind == "BEGIN" and status is None:
            current, lines = name, []
        elif kind == "END" and status is not None and name == current:
            # run_batch.sh writes a newline before END so END starts a line; drop it again.
            if lines and lines[-1] == "":
                lines.pop()
            records[name] = RunnerRecord(int(status), "\n".join(lines))
            current, lines = None, []
    return records


def _result_from_record(record: RunnerRecord | None, backend: str, timeout_s: float) -> tuple[object, bool]:
    """(Measurement or MeasurementFailure, whether the failure is a fault of the run).

    A GPU delegate that does not take the whole graph fails the entry but is no fault:
    it says the op does not run on the GPU, not that the phone or the setup is broken.
    """
    if record is None:
        return MeasurementFailure("the batch runner left no complete record for this model"), True
    if record.status in _TIMEOUT_STATUSES:
        return MeasurementFailure(
            f"benchmark_model ran past the per-model timeout of {timeout_s:g} s and was killed "
            f"(exit status {record.status}); last output: {_error_text(record.output)}"
        ), True
    if record.status != 0:
        signal = f", killed by signal {record.status - 128}" if record.status > 128 else ""
        return MeasurementFailure(
            f"benchmark_model exited with status {record.status}{signal}: {_error_text(record.output)}"
        ), True
    try:
        result = parse_benchmark_output(record.output)
    except BenchmarkOutputError as e:
        return MeasurementFailure(f"benchmark_model output could not be read: {e}"), True
    if backend == "gpu" and result.gpu_delegate != "full":
        state = result.gpu_delegate or "not mentioned"
        evidence = f": {result.gpu_delegate_line!r}" if result.gpu_delegate_line else ""
        return MeasurementFailure(
            f"the GPU delegate did not run the whole graph (delegation {state}{evidence}); "
            "not recorded as a GPU latency"
        ), False
    try:
        return Measurement(
            median_us=result.median_us if result.median_us is not None else result.avg_us,
            mean_us=result.avg_us,
            min_us=result.min_us,
            max_us=result.max_us,
            std_us=result.std_us,
            count=result.count,
        ), False
    except LutError as e:
        return MeasurementFailure(f"benchmark_model timings are not a usable latency: {e}"), True


def _error_text(output: str, lines: int = 5) -> str:
    """The lines of `output` that explain a failure: its errors, else its end."""
    text_lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in text_lines if re.search(r"error|fail|abort|fault|signal|denied|not found", line, re.I)]
    chosen = (errors or text_lines)[-lines:]
    return " | ".join(chosen) if chosen else "(no output)"


# ---------------------------------------------------------------- transport
def _tcp_transport(host: str, port: int):
    """adb-shell's TCP transport with three fixes that batches need.

    * A closed socket raises at once: adb-shell's transport returns b"" and its readers
      retry until their read timeout, which for a batch is minutes.
    * TCP_NODELAY: adb-shell writes a message's header and payload separately, and Nagle's
      algorithm then holds the payload until the header is acknowledged, which the peer
      delays (40 ms per message on Linux).
    * Writes send everything: on a non-blocking socket one `send` may take part of a chunk.
    """
    import select
    import socket

    from adb_shell.exceptions import TcpTimeoutException
    from adb_shell.transport.tcp_transport import TcpTransport

    class _BatchTcpTransport(TcpTransport):
        def connect(self, transport_timeout_s):
            super().connect(transport_timeout_s)
            self._connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def bulk_read(self, numbytes, transport_timeout_s):
            data = super().bulk_read(numbytes, transport_timeout_s)
            if not data:
                raise ConnectionResetError(f"the phone at {host}:{port} closed the connection")
            return data

        def bulk_write(self, data, transport_timeout_s):
            view = memoryview(data)
            while view:
                _, writable, _ = select.select([], [self._connection], [], transport_timeout_s)
                if not writable:
                    raise TcpTimeoutException(f"Sending to {host}:{port} timed out after {transport_timeout_s} s")
                view = view[self._connection.send(view):]
            return len(data)

    return _BatchTcpTransport(host, port)


@dataclasses.dataclass
class _Batch:
    """One batch on the phone, and how far it got (so a retry goes on where it stopped)."""

    directory: str
    tag: str
    entries: list[tuple[str, bytes, str]]  # (model_id, tflite, remote file name)
    archive: bytes  # the entries' models in one ustar archive, pushed as models/batch.tar
    read_battery: bool  # whether the runner's shell call also reads the battery temperature
    pushed: bool = False


class AdbDevice:
    """One phone's CPU or GPU through `benchmark_model` over ADB.  Use `open_device`."""

    def __init__(self, settings: AdbSettings, backend: str = "cpu", threads: int | None = None, *,
                 sleep: Callable[[float], None] = time.sleep):
        if backend not in ("cpu", "gpu"):
            raise ProfilerError(f"`backend` must be 'cpu' or 'gpu'. Received: backend={backend!r}.")
        backend_settings = settings.backend(backend)
        threads = threads if threads is not None else (backend_settings.threads or 1)
        if not isinstance(threads, int) or threads < 1:
            raise ProfilerError(f"`threads` must be a positive integer. Received: threads={threads!r}.")
        if backend_settings.taskset and threads > bin(int(backend_settings.taskset, 16)).count("1"):
            cpus = bin(int(backend_settings.taskset, 16)).count("1")
            raise ProfilerError(
                f"{threads} threads need {threads} CPUs, but [{settings.name}.{backend}] taskset = "
                f"{backend_settings.taskset!r} in {settings.source} allows {cpus}. Use --threads {cpus} or a wider mask."
            )
        self.name, self.backend, self.threads = settings.name, backend, threads
        self._settings, self._run = settings, backend_settings
        self._sleep = sleep
        self._bench = self._read_benchmark_model()
        self._bench_sha = hashlib.sha256(self._bench).hexdigest()
        self._runner = runner_script()
        self._flags = self._benchmark_flags()
        self._session = f"{settings.remote_dir}/runs/{secrets.token_hex(4)}"
        self._batches = itertools.count()
        self._phone_bytes = 0  # what the session's batches hold on the phone
        self._adb = None
        self._signer = self._load_signer()
        self._connect_first()
        try:
            self._phone = self._read_phone()
            self._check_abi()
            self._install()
        except BaseException:
            self._adb.close()
            raise
        self._battery_before = self._phone.get("battery_temp_c")
        self._battery_last = self._battery_before

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
        if self.backend == "gpu":
            delegate = "gpu"
        else:
            off = any(flag in ("--use_xnnpack=false", "--use_xnnpack=0") for flag in self._flags)
            delegate = "none" if off else "xnnpack"
        return {"device": self.name, "backend": self.backend, "threads": self.threads,
                "delegate": delegate, "flags": self._flags_text()}

    def fingerprint(self) -> dict[str, object]:
        phone = self._phone
        battery_now = self._retrying(self._read_battery)
        return {
            "model": phone.get("model"),
            "manufacturer": phone.get("manufacturer"),
            "serialno": phone.get("serialno"),
            "soc": phone.get("soc_model") or phone.get("board_platform") or phone.get("hardware"),
            "soc_manufacturer": phone.get("soc_manufacturer"),
            "board_platform": phone.get("board_platform"),
            "android": phone.get("android"),
            "sdk": phone.get("sdk"),
            "build": phone.get("build"),
            "abi": phone.get("abi"),
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
        for batch in _split_batches(models, self._settings.batch_size, int(self._settings.batch_mib * 2**20)):
            try:
                results = self._measure_batch(batch)
            except _BatchInterrupted as interrupted:
                # What the phone finished before Ctrl-C is handed on before the interrupt goes on,
                # so the caller commits it and a rerun measures only the rest.
                for index, (model_id, _) in enumerate(batch):
                    if index in interrupted.finished:
                        yield model_id, interrupted.finished[index][0]
                raise
            for model_id, (result, fault) in zip([m for m, _ in batch], results):
                yield model_id, result
                if fault:
                    consecutive_faults, last_fault = consecutive_faults + 1, result.error
                elif isinstance(result, Measurement):
                    consecutive_faults = 0
                if consecutive_faults >= self._settings.max_consecutive_failures:
                    raise ProfilerError(
                        f"{consecutive_faults} models in a row failed on {self.name}; stopping. Last error: "
                        f"{last_fault} Check benchmark_model ({self._settings.benchmark_model}) runs on the phone; "
                        "the failures are recorded, rerun with --retry-failed once fixed."
                    )

    def close(self) -> None:
        if self._adb is None:
            return
        try:
            if self._adb.available:
                self._adb.shell(f"rm -rf {shlex.quote(self._session)}", transport_timeout_s=_SETUP_TIMEOUT_S)
        except _connection_errors():
            pass  # the next session clears leftovers of this one
        finally:
            self._adb.close()
            self._adb = None

    # ------------------------------------------------------------ batches
    def _measure_batch(self, batch: list[tuple[str, bytes]]) -> list[tuple[object, bool]]:
        """Results of `batch` in order. The battery temperature comes with a batch that holds
        the conditions monitor's reference (it shows throttling when the reference drifts)."""
        return self._run_batch(batch, read_battery=any(model_id == REFERENCE_ID for model_id, _ in batch))

    def _run_batch(self, entries: list[tuple[str, bytes]], read_battery: bool) -> list[tuple[object, bool]]:
        directory = f"{self._session}/b{next(self._batches):05d}"
        named = [(model_id, data, _remote_name(i, model_id)) for i, (model_id, data) in enumerate(entries)]
        batch = _Batch(directory, secrets.token_hex(6), named, _batch_archive(named), read_battery)
        timeout_s = self._run.model_timeout_s
        try:
            records = self._retrying(lambda: self._run_batch_once(batch))
        except KeyboardInterrupt:
            records = self._records_after_interrupt(batch)
            raise _BatchInterrupted({
                index: _result_from_record(records[name], self.backend, timeout_s)
                for index, (_, _, name) in enumerate(batch.entries) if name in records
            }) from None
        return [_result_from_record(records.get(name), self.backend, timeout_s) for _, _, name in batch.entries]

    def _records_after_interrupt(self, batch: _Batch) -> dict[str, RunnerRecord]:
        """The records the runner had appended when Ctrl-C came (one per finished model), pulled
        over a fresh connection (the interrupted shell stream cannot be trusted); {} when none
        can be had. The hung-up runner stops, and its model's cut record is ignored."""
        if not batch.pushed:
            return {}
        try:
            if self._adb is not None:
                self._adb.close()
            self._connect()
            stream = io.BytesIO()
            self._adb.pull(f"{batch.directory}/records.txt", stream, transport_timeout_s=_SETUP_TIMEOUT_S,
                           read_timeout_s=_SETUP_TIMEOUT_S)
        except KeyboardInterrupt:
            return {}  # a second Ctrl-C: the user wants out now
        except Exception as e:  # noqa: BLE001 - best effort: an interrupt must not turn into another error
            _LOG.warning("%s: could not pull the interrupted batch's finished records (%s)", self.name, _reason(e))
            return {}
        return parse_runner_records(stream.getvalue().decode("utf-8", "replace"), batch.tag)

    def _run_batch_once(self, batch: _Batch) -> dict[str, RunnerRecord]:
        """Push the archive unless it is there, run (or resume) the runner, pull the records."""
        adb = self._adb
        if not batch.pushed:
            footprint = 2 * len(batch.archive)  # the archive, and the models unpacked from it
            self._make_room(footprint)
            # The phone makes the batch's directories as the file arrives (adbd's SEND makes parents).
            _push_files(adb, [(f"{batch.directory}/models/batch.tar", batch.archive, _FILE_MODE)])
            batch.pushed = True
            self._phone_bytes += footprint
        output = adb.shell(self._runner_command(batch), transport_timeout_s=self._silence_limit_s(),
                           read_timeout_s=self._silence_limit_s())
        self._note_battery(output)
        if "PHONEFIT_ERROR" in output:
            message = output.split("PHONEFIT_ERROR", 1)[1].splitlines()[0].strip()
            raise ProfilerError(f"The batch runner on {self.name} cannot run: {message}.")
        if "PHONEFIT_BATCH_DONE" not in output:
            raise _RunnerInterrupted(f"the batch runner stopped early; its last output: {_error_text(output)}")
        stream = io.BytesIO()
        adb.pull(f"{batch.directory}/records.txt", stream, transport_timeout_s=_SETUP_TIMEOUT_S,
                 read_timeout_s=_SETUP_TIMEOUT_S)
        return parse_runner_records(stream.getvalue().decode("utf-8", "replace"), batch.tag)

    def _make_room(self, footprint: int) -> None:
        """Remove the session's earlier batches once they and the next would hold more than
        `_SWEEP_BYTES` on the phone: between two batches, never next to a measurement, and
        rarely, since every removal is file-system work on the phone."""
        if self._phone_bytes and self._phone_bytes + footprint > _SWEEP_BYTES:
            self._adb.shell(f"rm -rf {shlex.quote(self._session)}/b[0-9]*", transport_timeout_s=_SETUP_TIMEOUT_S)
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
        battery = "; echo PHONEFIT_BATTERY; dumpsys battery 2>/dev/null" if batch.read_battery else ""
        return " ".join(map(shlex.quote, argv)) + battery

    def _silence_limit_s(self) -> float:
        """How long the runner's shell may stay silent before the link counts as dead.

        The runner prints a heartbeat every 10 s; the first model of a resumed batch may
        wait for the old runner's current model, which prints PHONEFIT_WAIT each second.
        """
        return 6 * _HEARTBEAT_S

    # ------------------------------------------------------------ connection
    def _load_signer(self):
        from adb_shell.auth.sign_pythonrsa import PythonRSASigner

        key = ensure_adb_key(self._settings.adb_key)
        try:
            return PythonRSASigner.FromRSAKeyPath(str(key))
        except (OSError, ValueError) as e:
            raise ProfilerError(f"Cannot read the ADB key {key} ({e}); set `adb_key` of [{self.name}] in {self._settings.source}.") from e

    def _make_adb(self):
        settings = self._settings
        if settings.transport == "tcp":
            from adb_shell.adb_device import AdbDevice as AdbShellDevice

            return AdbShellDevice(_tcp_transport(settings.host, settings.port), default_transport_timeout_s=_SETUP_TIMEOUT_S)
        from adb_shell import adb_device

        if adb_device.UsbTransport is None:
            raise ProfilerError(f"{self.name} is a USB phone; USB needs libusb: pip install 'adb-shell[usb]'.")
        # Raises UsbDeviceNotFoundError, a connection error: unplugged phones are retried.
        return adb_device.AdbDeviceUsb(serial=settings.serial, default_transport_timeout_s=_SETUP_TIMEOUT_S)

    def _connect(self) -> None:
        from adb_shell import exceptions

        if self._adb is None:
            self._adb = self._make_adb()
        prompted = []
        try:
            self._adb.connect(
                rsa_keys=[self._signer],
                transport_timeout_s=self._settings.connect_timeout_s,
                auth_timeout_s=self._settings.auth_timeout_s,
                read_timeout_s=self._settings.connect_timeout_s,
                auth_callback=lambda _device: prompted.append(True),
            )
        except exceptions.DeviceAuthError as e:
            raise self._auth_error() from e
        except _connection_errors() as e:
            self._adb.close()
            if prompted:  # it refused our signature, then did not accept the public key
                raise self._auth_error() from e
            raise

    def _connect_first(self) -> None:
        try:
            self._connect()
        except ProfilerError:
            raise
        except _connection_errors() as e:
            raise ProfilerError(f"Cannot reach {self.name} at {self._settings.address} ({_reason(e)}). {self._how_to_reach()}") from e

    def _auth_error(self) -> ProfilerError:
        return ProfilerError(
            f"{self.name} at {self._settings.address} did not accept this computer's ADB key {self._settings.adb_key}.pub: "
            "unlock the phone, accept the 'Allow debugging?' prompt (tick 'Always allow'), then run the command again."
        )

    def _how_to_reach(self) -> str:
        if self._settings.transport == "usb":
            return "Check the cable, that USB debugging is on, and that no adb server holds the phone (adb kill-server)."
        return (
            "Check that the phone is on the same network, that wireless debugging is on (or `adb tcpip 5555` was run "
            f"over USB), that {self._settings.address} is its address and port, and that no adb server holds it (adb kill-server)."
        )

    def _retrying(self, action: Callable[[], object]):
        """`action()`, reconnecting with exponential backoff when the connection drops."""
        from adb_shell import exceptions

        settings, failures = self._settings, 0
        while True:
            try:
                if self._adb is None or not self._adb.available:
                    self._connect()
                return action()
            except (exceptions.AdbCommandFailureException, exceptions.PushFailedError,
                    exceptions.DevicePathInvalidError) as e:
                raise ProfilerError(f"{self.name} refused a file operation in {settings.remote_dir}: {_reason(e)}.") from e
            except _connection_errors() as e:
                if self._adb is not None:
                    self._adb.close()
                    if settings.transport == "usb":  # a replugged phone is a new USB device
                        self._adb = None
                failures += 1
                if failures > settings.reconnect_tries:
                    raise ProfilerError(
                        f"Lost the connection to {self.name} at {settings.address} and could not go on after "
                        f"{settings.reconnect_tries} reconnects ({_reason(e)}). Every result so far is saved: run the "
                        f"same command again to resume. {self._how_to_reach()}"
                    ) from e
                delay = settings.reconnect_backoff_s * 2 ** (failures - 1)
                _LOG.warning("%s: connection lost (%s); reconnecting in %.1f s (try %d of %d)",
                             self.name, _reason(e), delay, failures, settings.reconnect_tries)
                self._sleep(delay)

    # ------------------------------------------------------------ setup
    def _read_benchmark_model(self) -> bytes:
        path = self._settings.benchmark_model
        try:
            return path.read_bytes()
        except OSError as e:
            raise ProfilerError(
                f"{self._settings.source}: [{self.name}] `benchmark_model` must be the local path of TFLite's benchmark_model "
                f"built for the phone. Received: benchmark_model={str(path)!r} ({e.strerror}). android_bench/README.md says how to get it."
            ) from e

    def _benchmark_flags(self) -> tuple[str, ...]:
        run = self._run
        return (
            f"--num_threads={self.threads}",
            f"--warmup_runs={run.warmup_runs}",
            f"--num_runs={run.num_runs}",
            f"--min_secs={run.min_secs:g}",
            *run.flags,
        )

    def _flags_text(self) -> str:
        pinned = f" (taskset {self._run.taskset})" if self._run.taskset else ""
        return " ".join(self._flags) + pinned

    def _install(self) -> None:
        """Push benchmark_model and the runner unless the phone has them already (by sha256)."""
        remote = self._settings.remote_dir
        files = {f"{remote}/benchmark_model": (self._bench, _EXEC_MODE), f"{remote}/run_batch.sh": (self._runner, _FILE_MODE)}

        def install():
            stale = self._stale_files(files)
            for path in stale:
                data, mode = files[path]
                self._adb.push(io.BytesIO(data), path, st_mode=mode, transport_timeout_s=_SETUP_TIMEOUT_S,
                               read_timeout_s=_SETUP_TIMEOUT_S)
            if stale:
                self._adb.shell(f"chmod 755 {shlex.quote(remote + '/benchmark_model')}", transport_timeout_s=_SETUP_TIMEOUT_S)
                still = self._stale_files(files)
                if still:
                    raise ProfilerError(f"Pushed {', '.join(still)} to {self.name}, but the phone reports other sha256 sums; is its storage full?")

        self._retrying(install)

    def _stale_files(self, files: dict[str, tuple[bytes, int]]) -> list[str]:
        q = shlex.quote
        paths = " ".join(q(p) for p in files)
        # Old sessions' batches go first: one phonefit per phone, and leftovers are large.
        output = self._adb.shell(
            f"rm -rf {q(self._settings.remote_dir + '/runs')}; mkdir -p {q(self._session)} && sha256sum {paths} 2>/dev/null; true",
            transport_timeout_s=_SETUP_TIMEOUT_S,
        )
        found = {}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
                found[parts[1]] = parts[0]
        return [path for path, (data, _) in files.items() if found.get(path) != hashlib.sha256(data).hexdigest()]

    def _read_phone(self) -> dict[str, object]:
        props = " ".join(f"{key}={prop}" for key, prop in _PROPS.items())
        command = (
            f"for kv in {props}; do echo \"prop ${{kv%%=*}}=$(getprop ${{kv#*=}})\"; done; "
            "for d in /sys/devices/system/cpu/cpufreq/policy*; do [ -d \"$d\" ] || continue; "
            "echo \"cpufreq|${d##*/}|$(cat $d/related_cpus 2>/dev/null)|$(cat $d/scaling_governor 2>/dev/null)|"
            "$(cat $d/cpuinfo_max_freq 2>/dev/null)|$(cat $d/scaling_max_freq 2>/dev/null)\"; done; "
            "echo PHONEFIT_BATTERY; dumpsys battery 2>/dev/null"
        )
        output = self._retrying(lambda: self._adb.shell(command, transport_timeout_s=_SETUP_TIMEOUT_S))
        return _parse_phone(output)

    def _check_abi(self) -> None:
        """A benchmark_model built for another processor fails every model; say so at once."""
        if self._bench[:4] != b"\x7fELF" or len(self._bench) < 20:
            return
        machine = int.from_bytes(self._bench[18:20], "little" if self._bench[5] == 1 else "big")
        runs_on = _ELF_MACHINES.get(machine)
        abis = str(self._phone.get("abilist") or self._phone.get("abi") or "").split(",")
        if runs_on and abis != [""] and not set(runs_on) & set(abis):
            raise ProfilerError(
                f"{self._settings.benchmark_model} is built for {runs_on[0]}, but {self.name} runs {', '.join(abis)}; "
                f"set `benchmark_model` of [{self.name}] in {self._settings.source} to a build for {abis[0]} "
                "(android_bench/README.md)."
            )

    def _read_battery(self) -> float | None:
        output = self._adb.shell("echo PHONEFIT_BATTERY; dumpsys battery 2>/dev/null", transport_timeout_s=_SETUP_TIMEOUT_S)
        self._note_battery(output)
        return self._battery_last

    def _note_battery(self, output: str) -> None:
        temperature = _battery_temp_c(output)
        if temperature is not None:
            self._battery_last = temperature


# ---------------------------------------------------------------- helpers
def _split_batches(models: Iterable[tuple[str, bytes]], size: int, max_bytes: int) -> Iterator[list[tuple[str, bytes]]]:
    """`models` in batches of `size`, a batch ending early before its models pass
    `max_bytes` (a model larger than that goes alone): what the phone and this computer
    hold of one batch stays bounded whatever the layers' sizes."""
    batch, held = [], 0
    for model in models:
        if batch and (len(batch) == size or held + len(model[1]) > max_bytes):
            yield batch
            batch, held = [], 0
        batch.append(model)
        held += len(model[1])
    if batch:
        yield batch


def _batch_archive(entries: list[tuple[str, bytes, str]]) -> bytes:
    """The models of `entries` ((model_id, tflite, remote name)) as one POSIX ustar archive,
    in order: plain files, mode 0644, owner 0 without names (run_batch.sh accepts only plain
    files).  Written directly: the format is fixed, and tarfile takes 25 µs a member."""
    mtime = int(time.time())
    parts = [_ustar_member(name, data, mtime) for _, data, name in entries]
    return b"".join(parts) + bytes(2 * _TAR_BLOCK)  # two zero blocks end an archive


def _ustar_member(name: str, data: bytes, mtime: int) -> bytes:
    """A 512-byte ustar header for a regular file, then `data` padded to whole blocks."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"A ustar member name has at most 100 bytes. Received: {name!r} ({len(encoded)} bytes).")
    header = bytearray(_TAR_BLOCK)
    for offset, value in ((0, encoded), (100, b"0000644\0"), (108, b"0000000\0"), (116, b"0000000\0"),
                          (124, b"%011o\0" % len(data)), (136, b"%011o\0" % mtime), (156, b"0"),
                          (257, b"ustar\x0000")):
        header[offset : offset + len(value)] = value
    header[148:156] = b"        "  # the checksum counts its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + bytes(-len(data) % _TAR_BLOCK)


def _push_files(adb, files: list[tuple[str, bytes, int]]) -> None:
    """Push `files` ((remote path, bytes, mode)) in one pipelined sync session.

    adb-shell's `push` opens a sync session per file and sends DATA in WRTEs of at most
    64 KiB, each waiting for its acknowledgement.  This sends every file's SEND/DATA/DONE
    back to back in WRTEs of the negotiated size (1 MiB) and reads the phone's per-file
    OKAYs as they come, as `adb push a b c dir/` does with deferred acknowledgements.  It
    uses adb-shell's message layer (stable since 0.3); where that differs, it falls back to
    one `push` per file.
    """
    if not files:
        return
    try:
        from adb_shell import constants
        from adb_shell.adb_message import AdbMessage

        open_stream, read_until, send, close_stream = adb._open, adb._read_until, adb._io_manager.send, adb._clse
        maxdata = adb._maxdata
    except (ImportError, AttributeError):
        for path, data, mode in files:
            adb.push(io.BytesIO(data), path, st_mode=mode, transport_timeout_s=_SETUP_TIMEOUT_S,
                     read_timeout_s=_SETUP_TIMEOUT_S)
        return
    class Message(AdbMessage):
        """adb-shell's message, its checksum (the sum of the payload's bytes, which ADB
        before version 0x01000001 sends and adb-shell speaks) summed by numpy: Python's
        `sum` takes 2.7 ms for a 400 KB batch."""

        @property
        def checksum(self) -> int:
            return _byte_sum(self.data)

    stream = open_stream(b"sync:", _SETUP_TIMEOUT_S, _SETUP_TIMEOUT_S, None)
    replies, confirmed = bytearray(), 0

    def take(cmd: bytes, data: bytes) -> None:
        """Count the phone's sync answers in a WRTE (read_until has acknowledged it)."""
        nonlocal confirmed
        if cmd == constants.CLSE:
            raise ConnectionResetError("the phone closed the sync session during a push")
        replies.extend(data)
        while len(replies) >= 8:
            kind, size = struct.unpack("<4sI", replies[:8])
            if kind == b"OKAY":
                del replies[:8]
                confirmed += 1
            elif kind == b"FAIL" and len(replies) >= 8 + size:
                reason = bytes(replies[8 : 8 + size]).decode("utf-8", "replace")
                raise ProfilerError(f"The phone refused a pushed file ({files[confirmed][0]}): {reason}.")
            elif kind == b"FAIL":
                return  # the rest of the message is in the next WRTE
            else:
                raise ProfilerError(f"The phone answered a push with {kind!r}; expected OKAY or FAIL.")

    pending = bytearray()
    for chunk in _sync_requests(files):
        pending += chunk
        while len(pending) >= maxdata:
            _write_stream(send, read_until, take, Message, constants, stream, bytes(pending[:maxdata]))
            del pending[:maxdata]
    if pending:
        _write_stream(send, read_until, take, Message, constants, stream, bytes(pending))
    while confirmed < len(files):
        take(*read_until([constants.WRTE, constants.CLSE], stream))
    close_stream(stream)


def _byte_sum(data: bytes) -> int:
    """The ADB checksum of `data`: the sum of its bytes, modulo 2**32."""
    return int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


def _sync_requests(files: list[tuple[str, bytes, int]]) -> Iterator[bytes]:
    """The sync protocol's SEND, DATA (64 KiB at most) and DONE requests of each file."""
    mtime = int(time.time())
    for path, data, mode in files:
        spec = f"{path},{mode}".encode()
        yield struct.pack("<4sI", b"SEND", len(spec)) + spec
        for start in range(0, len(data), _SYNC_DATA_MAX):
            chunk = data[start : start + _SYNC_DATA_MAX]
            yield struct.pack("<4sI", b"DATA", len(chunk)) + chunk
        yield struct.pack("<4sI", b"DONE", mtime)


def _write_stream(send, read_until, take, message, constants, stream, data: bytes) -> None:
    """One WRTE, then wait for its OKAY (ADB's flow control), taking the phone's WRTEs meanwhile."""
    send(message(constants.WRTE, stream.local_id, stream.remote_id, data), stream)
    while True:
        cmd, payload = read_until([constants.OKAY, constants.WRTE, constants.CLSE], stream)
        if cmd == constants.OKAY:
            return
        take(cmd, payload)


def _remote_name(index: int, model_id: str) -> str:
    """A file name that is safe unquoted and unique in its batch, e.g. `m007_conv2d_f32_8x8x16_32.tflite`."""
    hint = _SAFE_NAME_RE.sub("_", model_id).strip("._-")[:60] or "model"
    name = f"m{index:03d}_{hint}.tflite"
    assert _REMOTE_PART_RE.match(name)
    return name


def _battery_temp_c(output: str) -> float | None:
    """`dumpsys battery` prints `temperature: 312` in tenths of a degree Celsius."""
    after = output.split("PHONEFIT_BATTERY", 1)
    match = re.search(r"^\s*temperature:\s*(-?\d+)\s*$", after[-1], re.MULTILINE) if len(after) == 2 else None
    return int(match.group(1)) / 10 if match else None


def _parse_phone(output: str) -> dict[str, object]:
    phone: dict[str, object] = {}
    clusters = []
    for line in output.split("PHONEFIT_BATTERY", 1)[0].splitlines():
        if line.startswith("prop "):
            key, _, value = line[5:].partition("=")
            phone[key] = value.strip() or None
        elif line.startswith("cpufreq|"):
            _, policy, cpus, governor, max_khz, scaling_max_khz = (line.split("|") + [""] * 6)[:6]
            clusters.append({
                "policy": policy,
                "cpus": cpus.strip(),
                "governor": governor.strip() or None,
                "max_khz": int(max_khz) if max_khz.strip().isdigit() else None,
                "scaling_max_khz": int(scaling_max_khz) if scaling_max_khz.strip().isdigit() else None,
            })
    phone["cpu_clusters"] = clusters
    phone["battery_temp_c"] = _battery_temp_c(output)
    return phone


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


def open_adb(name: str, config: Mapping[str, object], backend: str, threads: int | None) -> AdbDevice:
    """The registry's factory of the `adb` kind (`profiler.devices.open_device`)."""
    settings = config.get("settings") if isinstance(config.get("settings"), AdbSettings) else parse_adb_settings(name, config)
    return AdbDevice(settings, backend, threads)
