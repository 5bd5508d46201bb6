"""A loopback ADB daemon: the device side of ADB on 127.0.0.1, so that tests need no phone.

`LoopbackAdbDaemon` listens on 127.0.0.1 (port 0: the OS picks one) and speaks the ADB wire
protocol as a phone's `adbd` does, so that adb-shell and Debian's `adb` client talk to it
unchanged:

* messages: a 24-byte little-endian header (command, arg0, arg1, data length, data check,
  magic = command ^ 0xffffffff) and its payload.  The magic is verified on every message;
  the data check (a byte sum) is verified and sent while the negotiated version is below
  0x01000001, and sent as 0 from that version on, as adbd does (adb-shell announces
  0x01000000 and checks sums; modern `adb` announces 0x01000001).  A bad header, a bad sum
  or an oversized payload ends the connection.
* CNXN: version = min(client's, 0x01000001), max payload = min(client's, 1 MiB).  The
  device banner is `device::ro.product.name=…;ro.product.model=…;ro.product.device=…;
  features=fixed_push_mkdir` (no `shell_v2`: shell is v1).
* AUTH (`auth="accept"` or `"reject"`): a TOKEN of 20 random bytes; a SIGNATURE is accepted
  when it is an RSA PKCS#1 v1.5 signature, with the SHA-1 DigestInfo prefix, of the token
  by one of the authorized keys (adb's public key format: base64 of Android's RSA public key
  struct, then ` user@host`); otherwise a new token is sent.  An RSAPUBLICKEY is accepted
  and remembered for the daemon's lifetime in mode "accept" (the phone's user tapped
  "Always allow"); in mode "reject" it is never answered, as a phone whose dialog is
  dismissed: adb-shell's `connect` then raises `TcpTimeoutException` after its
  `auth_timeout_s`.  `auth="none"` answers CNXN with CNXN directly (`ro.adb.secure=0`).
* streams: OPEN / OKAY / WRTE / CLSE with local and remote ids, many streams per connection
  (each served by its own thread; each connection by its own thread).  Flow control: at most
  one unacknowledged WRTE per stream; data the client writes is acknowledged once consumed.
  An OPEN of an unknown service is answered with CLSE, as adbd does.
* `shell:<command>` and `exec:<command>` (v1, raw: stdout and stderr merged, no exit
  status, no pty) run `/bin/sh -c <command>` in a session and process group of its own;
  WRTE data goes to its stdin.  When the client closes the stream before the command ends,
  or the connection is lost, the process group gets SIGHUP, as the pty that adbd gives a
  v1 shell sends it to its foreground group.  So, as on a phone, what left the group
  survives: `nohup`ed work, and a command under `timeout` without `--foreground` (timeout
  moves itself and the command into a group of their own).  Put `timeout` on the phone
  side to bound a hung command.  Closing the daemon kills every process of every session
  it started, whatever group it moved to.
* `sync:`: STAT (mode, size, mtime; all zero for a missing path, as adbd answers), LIST
  (DENT per entry, `.` and `..` included, then DONE), SEND (`path,mode`, DATA chunks of at
  most 64 KiB, DONE carrying the mtime; parent directories are created; an existing file
  is replaced, unlinked and created anew, as adbd does (so a running binary is never
  written in place); the mode's permission bits and the mtime are applied, so a pushed
  executable stays executable; a partial file is removed if the stream dies before DONE;
  symlinks are refused), RECV (DATA
  chunks of at most 64 KiB, then DONE), QUIT, and FAIL with a message for refused or
  failed requests.

Paths.  The device path `/data/local/tmp` is the host directory `root` given to the daemon:

* sync paths must lie under `/data/local/tmp` (after normalisation and symlink resolution);
  a SEND or RECV elsewhere gets FAIL `… Permission denied …`; a STAT elsewhere answers
  zeros and a LIST elsewhere an empty listing, which is what adbd answers for paths it may
  not read;
* shell command text has every `/data/local/tmp` rewritten to `root` and every
  `/sys/devices/system/cpu` to a fake sysfs directory, and the command output has those host
  paths rewritten back, so `pwd` or an error message shows device paths.  Only the command
  text and its output are rewritten (so is `/sys/class/thermal`, to a fake thermal directory):
  a script that hard-codes `/data/local/tmp` inside a
  pushed file is not (pass paths as arguments, or use relative paths);
* shell commands start in `root` (a real phone starts in `/`: `cd` explicitly), with
  `TMPDIR=root` and a PATH of: this Python's bin directory (so a pushed
  `#!/usr/bin/env python3` script runs with LiteRT available), the stand-ins below, then
  the host's PATH.  Everything else a shell command does runs on this machine.

Device stand-ins, for the commands a device fingerprint needs:

* `getprop` prints every property as `[name]: [value]`; `getprop NAME [DEFAULT]` prints the
  value (or DEFAULT, or an empty line).  Properties: `DEFAULT_PROPS` (a Pixel 7: model,
  name, device, manufacturer, `ro.soc.model`, `ro.soc.manufacturer`, `ro.board.platform`,
  `ro.build.version.release`, `ro.build.version.sdk`, `ro.build.fingerprint`,
  `ro.product.cpu.abi`, `ro.product.cpu.abilist`) updated with the `props` given.
* `dumpsys battery` prints the battery service state from `DEFAULT_BATTERY` (charging over
  USB, `level: 87`, `temperature: 312` in tenths of a °C) updated with the `battery` given
  (e.g. `battery={"temperature": 452}`: a hot phone; `{"USB powered": False, "status": 3}`:
  unplugged, discharging).  `dumpsys power`, `dumpsys display` and `dumpsys thermalservice`
  print the lines of those services that say whether the screen is on, whether battery saver
  is on and the thermal status: `DEFAULT_SERVICES` (screen off, saver off, `Thermal Status: 0`)
  updated with the `services` given (service name -> its whole output).  `dumpsys` with
  another service prints `Can't find service: NAME`.
* `/sys/class/thermal/thermal_zone0|1/` with `type` and `temp` (millidegrees Celsius): a
  battery and a CPU zone (see `THERMAL_ZONES`).
* `/sys/devices/system/cpu/`: `possible`, `present`, `online` (`0-7`);
  `cpufreq/policy0|4|6/` with `scaling_governor` (`schedutil`), `cpuinfo_max_freq`,
  `cpuinfo_min_freq`, `scaling_max_freq`, `scaling_min_freq`, `scaling_cur_freq`,
  `scaling_available_governors`, `related_cpus`, `affected_cpus`; and `cpuN/cpufreq` as a
  symlink to its policy, as on a phone: cpu0-3 at 1803000 kHz, cpu4-5 at 2348000 kHz,
  cpu6-7 at 2850000 kHz (see `CPU_CLUSTERS`).

Faults (`Faults`) reach the `benchmark_model` stand-in (tests/fake_benchmark_model.py,
pushed by the tests; `gpu_unavailable`: its GPU delegate cannot be created, as on a phone
without OpenCL; `partial_gpu_models` / `partial_nnapi_models`: the GPU / NNAPI delegate takes
all but one node of those models) through the environment variable `PHONEFIT_FAKE_BENCHMARK` (JSON),
set for every shell command.  The stand-in counts the models it ran in a file of the
daemon's private state directory (not in `root`, so that listings of `/data/local/tmp`
show only what was pushed).  With `drop_after_models=N`, the stand-in started after N models
have run asks the daemon to drop, once, and waits: the daemon resets every connection (TCP
RST: adb-shell raises `ConnectionResetError`), hangs up their process groups, and only then
marks the drop done.  A stand-in in a hung-up group has a fatal signal pending before the
mark exists and never sees it, so exactly N models have completed; a stand-in out of the
hang-up's reach (under `nohup`, or in the group of a `timeout` without `--foreground`) sees
the mark and goes on with its model.  Later connections work normally.
`daemon.models_run` reads the count.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import posixpath
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "CPU_CLUSTERS",
    "DEFAULT_BATTERY",
    "DEFAULT_PROPS",
    "DEFAULT_SERVICES",
    "FAKE_BENCHMARK_ENV",
    "REMOTE_ROOT",
    "THERMAL_ZONES",
    "Faults",
    "LoopbackAdbDaemon",
    "parse_adb_public_key",
]

_LOG = logging.getLogger(__name__)

REMOTE_ROOT = "/data/local/tmp"
_REMOTE_SYSFS_CPU = "/sys/devices/system/cpu"
_REMOTE_SYSFS_THERMAL = "/sys/class/thermal"
# The environment variable through which the `benchmark_model` stand-in gets its faults
# (tests/fake_benchmark_model.py reads the same name).
FAKE_BENCHMARK_ENV = "PHONEFIT_FAKE_BENCHMARK"
_MODELS_RUN_FILE = "models_run"
_DROP_REQUEST_FILE = "drop_requested"
_DROP_DONE_FILE = "drop_done"

DEFAULT_PROPS: Mapping[str, str] = {
    "ro.product.model": "Pixel 7",
    "ro.product.name": "panther",
    "ro.product.device": "panther",
    "ro.product.manufacturer": "Google",
    "ro.soc.manufacturer": "Google",
    "ro.soc.model": "GS201",
    "ro.board.platform": "gs201",
    "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
    "ro.build.fingerprint": "google/panther/panther:14/UQ1A.240205.004/11269751:user/release-keys",
    "ro.product.cpu.abi": "arm64-v8a",
    "ro.product.cpu.abilist": "arm64-v8a,armeabi-v7a,armeabi",
}
# (policy directory, cpus, cpuinfo_max_freq in kHz) of the fake sysfs: a Tensor G2.
CPU_CLUSTERS: tuple[tuple[str, tuple[int, ...], int], ...] = (
    ("policy0", (0, 1, 2, 3), 1803000),
    ("policy4", (4, 5), 2348000),
    ("policy6", (6, 7), 2850000),
)
_CPU_MIN_FREQ_KHZ = 300000
_GOVERNOR = "schedutil"
# `dumpsys battery`'s fields, in its order (temperature in tenths of a degree Celsius; status
# 2 = charging, 3 = discharging, 5 = full): a phone charging over USB.
DEFAULT_BATTERY: Mapping[str, object] = {
    "AC powered": False,
    "USB powered": True,
    "Wireless powered": False,
    "Max charging current": 500000,
    "Max charging voltage": 5000000,
    "Charge counter": 3915000,
    "status": 2,
    "health": 2,
    "present": True,
    "level": 87,
    "scale": 100,
    "voltage": 4312,
    "temperature": 312,
    "technology": "Li-ion",
}
# What `dumpsys SERVICE` prints for the services a doctor asks (the lines that matter, as
# Android 14 prints them): screen off, battery saver off, no thermal throttling.
DEFAULT_SERVICES: Mapping[str, str] = {
    "power": (
        "POWER MANAGER (dumpsys power)\n\n"
        "Power Manager State:\n"
        "  mWakefulness=Asleep\n"
        "  mIsPowered=true\n"
        "  mBatteryLevel=87\n"
        "  mLowPowerMode=false\n"
        "Display Power: state=OFF\n"
    ),
    "display": "DISPLAY MANAGER (dumpsys display)\n  mGlobalDisplayState=OFF\n  mScreenState=OFF\n",
    "thermalservice": (
        "IsStatusOverride: false\n"
        "ThermalEventListeners:\n\tcallbacks: 1\n"
        "Thermal Status: 0\n"
        "Cached temperatures:\n"
        "\tTemperature{mValue=31.2, mType=2, mName=battery, mStatus=0}\n"
    ),
}
# (zone, type, temp in millidegrees Celsius) of the fake /sys/class/thermal.
THERMAL_ZONES: tuple[tuple[str, str, int], ...] = (
    ("thermal_zone0", "battery", 31200),
    ("thermal_zone1", "cpu-1-0-usr", 38500),
)

# Wire protocol constants (AOSP adb's protocol.txt).
A_VERSION_MIN = 0x01000000
A_VERSION_SKIP_CHECKSUM = 0x01000001
MAX_PAYLOAD = 1024 * 1024
SYNC_DATA_MAX = 64 * 1024
_SYNC_PATH_MAX = 1024
_AUTH_TOKEN, _AUTH_SIGNATURE, _AUTH_RSAPUBLICKEY = 1, 2, 3
_TOKEN_SIZE = 20
_FEATURES = ("fixed_push_mkdir",)
_HEADER = struct.Struct("<6I")
_SYNC_HEADER = struct.Struct("<4sI")
_SYNC_STAT = struct.Struct("<4sIII")
_SYNC_DENT = struct.Struct("<4sIIII")
# DER DigestInfo prefix for SHA-1: what adbd's RSA_verify(NID_sha1, token, …) expects.
_SHA1_DIGEST_INFO = bytes.fromhex("3021300906052b0e03021a05000414")
# Android's RSAPublicKey struct: modulus size in words, n0inv, modulus, R^2, exponent.
_ANDROID_PUBKEY = struct.Struct("<II256s256sI")
_ANDROID_PUBKEY_WORDS = 64
_AUTH_MODES = ("accept", "reject", "none")
# Characters allowed in the host paths spliced into shell command text.
_SHELL_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")
_PATH_CHAR = rb"[A-Za-z0-9_.+-]"


def _command_id(name: bytes) -> int:
    return int.from_bytes(name, "little")


A_CNXN, A_AUTH, A_OPEN, A_OKAY, A_WRTE, A_CLSE = (
    _command_id(n) for n in (b"CNXN", b"AUTH", b"OPEN", b"OKAY", b"WRTE", b"CLSE")
)
_COMMAND_NAMES = {_command_id(n): n.decode() for n in (b"CNXN", b"AUTH", b"OPEN", b"OKAY", b"WRTE", b"CLSE", b"SYNC", b"STLS")}


@dataclasses.dataclass(frozen=True)
class Faults:
    """Faults of the fake phone; file-name fields match substrings of the model's file name."""

    drop_after_models: int | None = None  # reset all connections once this many models ran (once)
    hang_models: tuple[str, ...] = ()  # benchmark_model sleeps forever
    garbage_models: tuple[str, ...] = ()  # benchmark_model prints garbage instead of timings
    crash_models: tuple[str, ...] = ()  # benchmark_model prints an error and exits with 134
    partial_gpu_models: tuple[str, ...] = ()  # with --use_gpu=true the delegate takes part of the graph
    partial_nnapi_models: tuple[str, ...] = ()  # with --use_nnapi=true the NNAPI delegate takes part of the graph
    slow_runs: tuple[int, int] | None = None  # models started while [first, end) models had run are slowed
    slow_factor: float = 2.0  # ... by this factor (a throttled phone)
    steady_us: float | None = None  # every run reports this many µs (times the slow factor): no host noise
    gpu_unavailable: bool = False  # with --use_gpu=true the GPU delegate cannot be created (runs on the CPU)

    def __post_init__(self) -> None:
        if self.slow_runs is not None:
            first, end = self.slow_runs
            if not 0 <= first < end or not self.slow_factor > 0:
                raise ValueError(f"`slow_runs` must be [first, end) with 0 <= first < end and `slow_factor` positive. "
                                 f"Received: slow_runs={self.slow_runs!r}, slow_factor={self.slow_factor!r}.")
        n = self.drop_after_models
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"`drop_after_models` must be a positive integer or None. Received: drop_after_models={n!r}.")
        for field in ("hang_models", "garbage_models", "crash_models", "partial_gpu_models", "partial_nnapi_models"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(
                    f"`{field}` must be a tuple of non-empty file-name substrings. Received: {field}={value!r}."
                )
            object.__setattr__(self, field, tuple(value))


@dataclasses.dataclass(frozen=True)
class _RsaPublicKey:
    modulus: int
    exponent: int
    comment: str


def _byte_sum(data: bytes) -> int:
    """A message's data check: the sum of its bytes, modulo 2**32 (summed by numpy, as adbd
    sums in C: Python's `sum` would make this phone slow at receiving)."""
    return int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


def parse_adb_public_key(text: str) -> _RsaPublicKey:
    """The RSA key of one line of an adb public key file (`<base64 struct> user@host`)."""
    fields = text.strip().rstrip("\0").split(None, 1)
    if not fields:
        raise ValueError("An adb public key must be `<base64 of the key struct> user@host`. Received an empty string.")
    try:
        blob = base64.b64decode(fields[0], validate=True)
    except ValueError as e:
        raise ValueError(f"An adb public key must start with base64. Received: {fields[0][:40]!r}….") from e
    if len(blob) != _ANDROID_PUBKEY.size:
        raise ValueError(
            f"An adb public key struct must be {_ANDROID_PUBKEY.size} bytes (a 2048-bit key). Received: {len(blob)} bytes."
        )
    words, _n0inv, modulus, _rr, exponent = _ANDROID_PUBKEY.unpack(blob)
    if words != _ANDROID_PUBKEY_WORDS:
        raise ValueError(f"An adb public key must have {_ANDROID_PUBKEY_WORDS} modulus words. Received: {words}.")
    return _RsaPublicKey(int.from_bytes(modulus, "little"), exponent, fields[1] if len(fields) > 1 else "")


def _signature_matches(key: _RsaPublicKey, token: bytes, signature: bytes) -> bool:
    """Whether `signature` is key's PKCS#1 v1.5 signature of `token` taken as a SHA-1 digest."""
    size = (key.modulus.bit_length() + 7) // 8
    value = int.from_bytes(signature, "big")
    if len(signature) != size or value >= key.modulus:
        return False
    encoded = pow(value, key.exponent, key.modulus).to_bytes(size, "big")
    digest_info = _SHA1_DIGEST_INFO + token
    expected = b"\x00\x01" + b"\xff" * (size - 3 - len(digest_info)) + b"\x00" + digest_info
    return hmac.compare_digest(encoded, expected)


class _Closed(Exception):
    """The stream or its connection is closed."""


class _ProtocolError(Exception):
    """The peer sent something that ends the connection."""


# ----------------------------------------------------------------------------- paths


class _PathMap:
    """Device path prefixes <-> host directories, for shell text, shell output and sync paths."""

    def __init__(self, root: Path, sysfs_cpu: Path, sysfs_thermal: Path):
        self.root = root
        self._pairs = (
            (REMOTE_ROOT, str(root)), (_REMOTE_SYSFS_CPU, str(sysfs_cpu)), (_REMOTE_SYSFS_THERMAL, str(sysfs_thermal))
        )
        self._to_host_re = re.compile(
            "|".join(re.escape(device) for device, _ in self._pairs) + r"(?![A-Za-z0-9_.+-])"
        )
        self._to_device = {host.encode(): device.encode() for device, host in self._pairs}
        hosts = sorted(self._to_device, key=len, reverse=True)
        self.host_prefixes = hosts
        self._to_device_re = re.compile(b"(?:" + b"|".join(re.escape(h) for h in hosts) + b")(?!" + _PATH_CHAR + b")")

    def command_to_host(self, command: str) -> str:
        hosts = dict(self._pairs)
        return self._to_host_re.sub(lambda m: hosts[m.group(0)], command)

    def output_to_device(self, data: bytes) -> bytes:
        return self._to_device_re.sub(lambda m: self._to_device[m.group(0)], data)

    def sync_path(self, device_path: str) -> Path | None:
        """The host path of a sync request's device path, or None when it is outside the root."""
        normal = posixpath.normpath(device_path)
        if "\0" in normal or normal != REMOTE_ROOT and not normal.startswith(REMOTE_ROOT + "/"):
            return None
        host = Path(os.path.realpath(str(self.root) + normal[len(REMOTE_ROOT):]))
        return host if host == self.root or self.root in host.parents else None


class _OutputRewriter:
    """Rewrites host paths in a byte stream to device paths, across chunk boundaries."""

    def __init__(self, paths: _PathMap):
        self._paths = paths
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        data = self._pending + data
        keep = self._held_back(data)
        self._pending = data[len(data) - keep:]
        return self._paths.output_to_device(data[: len(data) - keep])

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return self._paths.output_to_device(data)

    def _held_back(self, data: bytes) -> int:
        # A tail that may be the start of a host path (or a whole one, whose next byte decides).
        longest = max(len(h) for h in self._paths.host_prefixes)
        for k in range(min(len(data), longest), 0, -1):
            if any(h.startswith(data[-k:]) for h in self._paths.host_prefixes):
                return k
        return 0


# ----------------------------------------------------------------------------- streams


class _Stream:
    """One ADB stream: our local id, the client's remote id, flow control and an inbox."""

    def __init__(self, connection: _Connection, local_id: int, remote_id: int):
        self.connection = connection
        self.local_id = local_id
        self.remote_id = remote_id
        self._inbox: queue.Queue[bytes | None] = queue.Queue()
        self._acked = threading.Event()
        self._acked.set()
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._clse_sent = False

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def write(self, data: bytes) -> None:
        """Send data in WRTEs of at most the negotiated payload, one unacknowledged at a time."""
        limit = self.connection.max_payload
        for start in range(0, len(data), limit):
            self._acked.wait()
            if self.closed:
                raise _Closed
            self._acked.clear()
            self.connection.send(A_WRTE, self.local_id, self.remote_id, data[start : start + limit])

    def read(self) -> bytes:
        """The next WRTE payload from the client (acknowledged), or b'' once the stream is closed."""
        data = self._inbox.get()
        if data is None:
            self._inbox.put(None)  # later readers see the end too
            return b""
        with contextlib.suppress(_Closed):
            self.connection.send(A_OKAY, self.local_id, self.remote_id)
        return data

    def finish(self) -> None:
        """The service is done: once the last WRTE is acknowledged, send CLSE."""
        self._acked.wait()
        with self._close_lock:
            if self._clse_sent or self.closed:
                return
            self._clse_sent = True
        with contextlib.suppress(_Closed):
            self.connection.send(A_CLSE, self.local_id, self.remote_id)

    # Called by the connection's reader thread.
    def on_okay(self) -> None:
        self._acked.set()

    def on_write(self, data: bytes) -> None:
        self._inbox.put(data)

    def on_close(self) -> None:
        """The client closed the stream: answer CLSE unless we already sent ours."""
        with self._close_lock:
            reply = not self._clse_sent
            self._clse_sent = True
        self.abort()
        if reply:
            with contextlib.suppress(_Closed):
                self.connection.send(A_CLSE, self.local_id, self.remote_id)

    def abort(self) -> None:
        self._closed.set()
        self._acked.set()
        self._inbox.put(None)


class _StreamReader:
    """Exact-size reads from a stream's byte sequence (sync requests span WRTEs freely)."""

    def __init__(self, stream: _Stream):
        self._stream = stream
        self._buffer = bytearray()

    def read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self._stream.read()
            if not chunk:
                raise _Closed
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


class _ReplyBuffer:
    """Sync replies gathered into WRTEs of up to the negotiated payload."""

    def __init__(self, stream: _Stream):
        self._stream = stream
        self._buffer = bytearray()

    def add(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= self._stream.connection.max_payload:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            self._stream.write(data)


# ----------------------------------------------------------------------------- connection


class _Connection:
    """One transport connection: handshake, authentication, then streams."""

    def __init__(self, daemon: LoopbackAdbDaemon, sock: socket.socket, number: int):
        self.daemon = daemon
        self.number = number
        self._sock = sock
        self._send_lock = threading.Lock()
        self.version = A_VERSION_MIN
        self.max_payload = MAX_PAYLOAD
        self._online = False
        self._token = b""
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen] = set()
        self._dead = threading.Event()
        self._handlers: dict[int, Callable[[int, int, bytes], None]] = {
            A_CNXN: self._on_cnxn,
            A_AUTH: self._on_auth,
            A_OPEN: self._on_open,
            A_OKAY: self._on_okay,
            A_WRTE: self._on_wrte,
            A_CLSE: self._on_clse,
        }

    # --- transport

    def serve(self) -> None:
        try:
            while True:
                command, arg0, arg1, data = self._read_message()
                handler = self._handlers.get(command)
                if handler is None:
                    _LOG.debug("connection %d: ignoring %s", self.number, _COMMAND_NAMES.get(command, hex(command)))
                elif self._online or command in (A_CNXN, A_AUTH):
                    handler(arg0, arg1, data)
        except (_Closed, _ProtocolError, OSError) as e:
            _LOG.debug("connection %d ends: %r", self.number, e)
        finally:
            self._teardown()

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        check = _byte_sum(data) if self.version < A_VERSION_SKIP_CHECKSUM else 0
        header = _HEADER.pack(command, arg0, arg1, len(data), check, command ^ 0xFFFFFFFF)
        with self._send_lock:
            if self._dead.is_set():
                raise _Closed
            try:
                self._sock.sendall(header + data)
            except OSError as e:
                self._dead.set()
                raise _Closed from e

    def abort(self) -> None:
        """Reset the connection (TCP RST), as a phone that drops off the network.

        Its commands are hung up here, before this returns, not later by the reader thread."""
        self._dead.set()
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._sock.shutdown(socket.SHUT_RD)  # wakes the reader thread; close() then sends RST
        self._hang_up()

    def _hang_up(self) -> None:
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            _signal_group(process, signal.SIGHUP)

    def _read_exact(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise _Closed
            data += chunk
        return bytes(data)

    def _read_message(self) -> tuple[int, int, int, bytes]:
        command, arg0, arg1, length, check, magic = _HEADER.unpack(self._read_exact(_HEADER.size))
        if magic != command ^ 0xFFFFFFFF:
            raise _ProtocolError(f"bad magic {magic:#010x} for command {command:#010x}")
        if length > self.max_payload:
            raise _ProtocolError(f"payload of {length} bytes exceeds the maximum of {self.max_payload}")
        data = self._read_exact(length) if length else b""
        if self.version < A_VERSION_SKIP_CHECKSUM and _byte_sum(data) != check:
            raise _ProtocolError(f"data check {check} does not match the payload's sum {_byte_sum(data)}")
        return command, arg0, arg1, data

    def _teardown(self) -> None:
        self._dead.set()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.abort()
        self._hang_up()
        with contextlib.suppress(OSError):
            self._sock.close()
        self.daemon._forget(self)

    # --- handshake and authentication

    def _on_cnxn(self, version: int, max_data: int, data: bytes) -> None:
        self.version = min(version, A_VERSION_SKIP_CHECKSUM)
        self.max_payload = max(min(max_data, MAX_PAYLOAD), 1)
        _LOG.debug("connection %d: CNXN %r version %#x max payload %d", self.number, data, self.version, self.max_payload)
        if self._online or self.daemon.auth == "none":
            self._go_online()
        else:
            self._send_token()

    def _on_auth(self, kind: int, _arg1: int, data: bytes) -> None:
        if self._online or self.daemon.auth == "none":
            return
        if kind == _AUTH_SIGNATURE:
            if any(_signature_matches(key, self._token, data) for key in self.daemon._authorized_keys()):
                self._go_online()
            else:
                self._send_token()
        elif kind == _AUTH_RSAPUBLICKEY:
            if self.daemon.auth == "accept":
                try:
                    key = parse_adb_public_key(data.rstrip(b"\0").decode("ascii", "replace"))
                except ValueError as e:
                    _LOG.debug("connection %d: unreadable public key: %s", self.number, e)
                    return
                self.daemon._authorize(key)
                self._go_online()
            else:
                _LOG.debug("connection %d: public key left unanswered (auth='reject')", self.number)

    def _send_token(self) -> None:
        self._token = secrets.token_bytes(_TOKEN_SIZE)
        self.send(A_AUTH, _AUTH_TOKEN, 0, self._token)

    def _go_online(self) -> None:
        self._online = True
        self.send(A_CNXN, A_VERSION_SKIP_CHECKSUM, self.max_payload, self.daemon.banner)

    # --- streams

    def _on_open(self, remote_id: int, _window: int, data: bytes) -> None:
        service = data.rstrip(b"\0").decode("utf-8", "replace")
        run = self.daemon._service_for(service)
        if remote_id == 0 or run is None:
            _LOG.debug("connection %d: refusing service %r", self.number, service)
            self.send(A_CLSE, 0, remote_id)
            return
        with self._lock:
            local_id = self._next_local_id
            self._next_local_id += 1
            stream = _Stream(self, local_id, remote_id)
            self._streams[local_id] = stream
        self.send(A_OKAY, local_id, remote_id)
        threading.Thread(target=self._run_service, args=(run, stream), name=f"adb-{service[:20]}", daemon=True).start()

    def _run_service(self, run: Callable[[_Stream], None], stream: _Stream) -> None:
        try:
            run(stream)
            stream.finish()
        except _Closed:
            pass
        except Exception:  # a bug in a service must not take the connection down silently
            _LOG.exception("connection %d: service failed", self.number)
            stream.finish()

    def _stream(self, remote_id: int, local_id: int) -> _Stream | None:
        with self._lock:
            stream = self._streams.get(local_id)
        return stream if stream is not None and stream.remote_id == remote_id else None

    def _on_okay(self, remote_id: int, local_id: int, _data: bytes) -> None:
        if stream := self._stream(remote_id, local_id):
            stream.on_okay()

    def _on_wrte(self, remote_id: int, local_id: int, data: bytes) -> None:
        if stream := self._stream(remote_id, local_id):
            stream.on_write(data)

    def _on_clse(self, remote_id: int, local_id: int, _data: bytes) -> None:
        if stream := self._stream(remote_id, local_id):
            with self._lock:
                self._streams.pop(local_id, None)
            stream.on_close()

    # --- processes of shell streams

    def track(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.add(process)
        if self._dead.is_set():
            _signal_group(process, signal.SIGHUP)

    def untrack(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)


def _pid_is_ours(process: subprocess.Popen) -> bool:
    """Whether the command's pid still names its process group and session.

    Once the shell is reaped, Linux keeps its pid unused while any member of its group or
    session lives; a live process with that pid means they are gone and the pid reused.
    """
    if process.returncode is None:
        return True
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return True
    return False


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signal the command's process group (its shell may be gone while its children are not)."""
    if _pid_is_ours(process):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)


def _kill_sessions(processes: Iterable[subprocess.Popen]) -> None:
    """SIGKILL every process of the commands' sessions, including the process groups their
    children made for themselves (`timeout` does), so that nothing outlives the daemon.
    Each command started a session of its own; Linux lists sessions in /proc."""
    sessions = {process.pid for process in processes if _pid_is_ours(process)}
    killed: set[int] = set()
    while sessions and (members := set(_session_members(sessions)) - killed):
        for pid in members:  # a member killed while forking leaves no child: no new pids then
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed |= members  # zombies stay listed until reaped: never signal them twice


def _session_members(sessions: set[int]) -> list[int]:
    """Pids of the processes whose session id is in `sessions` (none where /proc is missing)."""
    members = []
    with contextlib.suppress(OSError):
        entries = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
        for name in entries:
            try:
                with open(f"/proc/{name}/stat", "rb") as file:
                    fields = file.read().rpartition(b")")[2].split()  # state ppid pgrp session ...
            except OSError:
                continue  # gone meanwhile
            if len(fields) > 3 and int(fields[3]) in sessions:
                members.append(int(name))
    return members


# ----------------------------------------------------------------------------- services


def _run_shell(daemon: LoopbackAdbDaemon, command: str, stream: _Stream) -> None:
    """shell v1 / exec: run the command, stream its merged output, feed it the client's data."""
    argv = ["/bin/sh", "-c", daemon._paths.command_to_host(command)] if command else ["/bin/sh"]
    process = subprocess.Popen(
        argv,
        cwd=daemon.root,
        env=daemon._shell_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    daemon._started(process)
    stream.connection.track(process)
    threading.Thread(target=_feed_stdin, args=(stream, process), daemon=True).start()
    rewriter = _OutputRewriter(daemon._paths)
    try:
        while chunk := os.read(process.stdout.fileno(), SYNC_DATA_MAX):
            stream.write(rewriter.feed(chunk))
        stream.write(rewriter.flush())
        process.wait()
    finally:
        if process.poll() is None:  # the stream died before the command ended
            _signal_group(process, signal.SIGHUP)
        process.stdout.close()
        stream.connection.untrack(process)


def _feed_stdin(stream: _Stream, process: subprocess.Popen) -> None:
    """Client data to the command's stdin; hang the command up if the client closes first."""
    with contextlib.suppress(OSError, ValueError):  # the command may exit first
        while data := stream.read():
            process.stdin.write(data)
            process.stdin.flush()
    with contextlib.suppress(OSError, ValueError):
        process.stdin.close()
    if stream.closed and process.poll() is None:
        _signal_group(process, signal.SIGHUP)


class _SyncSession:
    """The `sync:` service of one stream: requests in, replies out, until QUIT or close."""

    def __init__(self, daemon: LoopbackAdbDaemon, stream: _Stream):
        self._paths = daemon._paths
        self._stream = stream
        self._requests = _StreamReader(stream)
        self._replies = _ReplyBuffer(stream)
        self._handlers: dict[bytes, Callable[[str], bool]] = {
            b"STAT": self._stat,
            b"LIST": self._list,
            b"SEND": self._send,
            b"RECV": self._recv,
        }

    def run(self) -> None:
        with contextlib.suppress(_SyncAbort):
            self._serve()

    def _serve(self) -> None:
        while True:
            request, length = _SYNC_HEADER.unpack(self._requests.read_exact(_SYNC_HEADER.size))
            if request == b"QUIT":
                return
            handler = self._handlers.get(request)
            if handler is None:
                self._fail(f"unknown sync command {request!r}")
                return
            if length > _SYNC_PATH_MAX:
                self._fail(f"path too long: {length} bytes (at most {_SYNC_PATH_MAX})")
                return
            path = self._requests.read_exact(length).decode("utf-8", "surrogateescape")
            keep_going = handler(path)
            self._replies.flush()
            if not keep_going:
                return

    def _fail(self, message: str) -> None:
        data = message.encode("utf-8", "replace")
        self._replies.add(_SYNC_HEADER.pack(b"FAIL", len(data)) + data)
        self._replies.flush()

    def _stat(self, path: str) -> bool:
        host = self._paths.sync_path(path)
        try:
            info = os.lstat(host) if host is not None else None
        except OSError:
            info = None
        fields = (info.st_mode, info.st_size, int(info.st_mtime)) if info else (0, 0, 0)
        self._replies.add(_SYNC_STAT.pack(b"STAT", *(v & 0xFFFFFFFF for v in fields)))
        return True

    def _list(self, path: str) -> bool:
        host = self._paths.sync_path(path)
        names: list[str] = []
        if host is not None and host.is_dir():
            with contextlib.suppress(OSError):
                names = [".", "..", *sorted(os.listdir(host))]
        for name in names:
            try:
                info = os.lstat(host / name)
            except OSError:
                continue
            encoded = name.encode("utf-8", "surrogateescape")
            fields = (info.st_mode, info.st_size, int(info.st_mtime))
            self._replies.add(_SYNC_DENT.pack(b"DENT", *(v & 0xFFFFFFFF for v in fields), len(encoded)) + encoded)
        self._replies.add(_SYNC_DENT.pack(b"DONE", 0, 0, 0, 0))
        return True

    def _send(self, spec: str) -> bool:
        path, comma, mode_text = spec.rpartition(",")
        if not comma or not mode_text.isdigit():
            self._fail(f"bad SEND request {spec!r}: expected 'path,mode'")
            return False
        mode = int(mode_text)
        host = self._paths.sync_path(path)
        if host is None:
            reason = f"couldn't create file: Permission denied ({path} is outside {REMOTE_ROOT})"
        elif stat.S_ISLNK(mode):
            reason = f"couldn't create symlink {path}: symlinks are not supported by the loopback daemon"
        elif host.is_dir():
            reason = f"couldn't create file: Is a directory ({path})"
        else:
            reason = None
        if reason is None:
            try:
                file = _create_replacing(host)
            except OSError as e:
                reason = f"couldn't create file: {e.strerror} ({path})"
        if reason is not None:
            self._receive_file(None)  # consume the data so that the client reads our answer
            self._fail(reason)
            return True
        try:
            with file:
                mtime = self._receive_file(file)
            os.chmod(host, stat.S_IMODE(mode))
            os.utime(host, (mtime, mtime))
        except OSError as e:  # e.g. a full disk: the rest of the push cannot be trusted
            host.unlink(missing_ok=True)
            self._fail(f"couldn't write file: {e.strerror} ({path})")
            raise _SyncAbort from e
        except BaseException:
            host.unlink(missing_ok=True)  # as adbd: no partial file after a failed push
            raise
        self._replies.add(_SYNC_HEADER.pack(b"OKAY", 0))
        return True

    def _receive_file(self, file) -> int:
        """Write DATA chunks to `file` (or drop them) until DONE; the DONE's mtime."""
        while True:
            kind, size = _SYNC_HEADER.unpack(self._requests.read_exact(_SYNC_HEADER.size))
            if kind == b"DONE":
                return size
            if kind != b"DATA" or size > SYNC_DATA_MAX:
                self._fail(f"expected DATA of at most {SYNC_DATA_MAX} bytes or DONE; received {kind!r} of {size} bytes")
                raise _SyncAbort
            data = self._requests.read_exact(size)
            if file is not None:
                file.write(data)

    def _recv(self, path: str) -> bool:
        host = self._paths.sync_path(path)
        if host is None:
            self._fail(f"open failed: Permission denied ({path} is outside {REMOTE_ROOT})")
            return True
        try:
            file = open(host, "rb")
        except OSError as e:
            self._fail(f"open failed: {e.strerror}")
            return True
        with file:
            while chunk := file.read(SYNC_DATA_MAX):
                self._replies.add(_SYNC_HEADER.pack(b"DATA", len(chunk)) + chunk)
        self._replies.add(_SYNC_HEADER.pack(b"DONE", 0))
        return True


def _create_replacing(host: Path):
    """A new file at `host` for writing, as adbd's SEND makes it: parents made, an existing
    file unlinked first, then created exclusively."""
    host.parent.mkdir(parents=True, exist_ok=True)
    host.unlink(missing_ok=True)
    return os.fdopen(os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")


class _SyncAbort(Exception):
    """A malformed push: the sync session ends after its FAIL, as adbd's does."""


# ----------------------------------------------------------------------------- device files


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _make_sysfs_cpu(directory: Path) -> None:
    cpus = [cpu for _, members, _ in CPU_CLUSTERS for cpu in members]
    span = f"{min(cpus)}-{max(cpus)}\n"
    for name in ("possible", "present", "online"):
        _write(directory / name, span)
    for policy, members, max_khz in CPU_CLUSTERS:
        members_text = " ".join(map(str, members)) + "\n"
        files = {
            "scaling_governor": _GOVERNOR,
            "scaling_available_governors": f"{_GOVERNOR} performance powersave",
            "cpuinfo_max_freq": max_khz,
            "cpuinfo_min_freq": _CPU_MIN_FREQ_KHZ,
            "scaling_max_freq": max_khz,
            "scaling_min_freq": _CPU_MIN_FREQ_KHZ,
            "scaling_cur_freq": max_khz,
            "related_cpus": members_text.strip(),
            "affected_cpus": members_text.strip(),
        }
        for name, value in files.items():
            _write(directory / "cpufreq" / policy / name, f"{value}\n")
        for cpu in members:
            (directory / f"cpu{cpu}").mkdir(parents=True, exist_ok=True)
            (directory / f"cpu{cpu}" / "cpufreq").symlink_to(Path("..") / "cpufreq" / policy)


def _getprop_script(props: Mapping[str, str], listing: Path) -> str:
    cases = "".join(f"  {shlex.quote(k)}) printf '%s\\n' {shlex.quote(v)} ;;\n" for k, v in sorted(props.items()))
    return (
        "#!/bin/sh\n"
        "# getprop stand-in of the loopback ADB daemon\n"
        f'[ "$#" -eq 0 ] && exec cat {shlex.quote(str(listing))}\n'
        'case "$1" in\n'
        f"{cases}"
        "  *) printf '%s\\n' \"${2-}\" ;;\n"
        "esac\n"
    )


def _make_sysfs_thermal(directory: Path) -> None:
    for zone, kind, millidegrees in THERMAL_ZONES:
        _write(directory / zone / "type", f"{kind}\n")
        _write(directory / zone / "temp", f"{millidegrees}\n")


def _battery_text(battery: Mapping[str, object]) -> str:
    def text(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return "Current Battery Service state:\n" + "".join(f"  {key}: {text(value)}\n" for key, value in battery.items())


def _dumpsys_script(outputs: Mapping[str, Path]) -> str:
    """`dumpsys SERVICE` prints the file of `outputs[SERVICE]`."""
    cases = "".join(f"  {shlex.quote(name)}) exec cat {shlex.quote(str(path))} ;;\n" for name, path in outputs.items())
    listing = "".join(f"  {name}\\n" for name in outputs)
    return (
        "#!/bin/sh\n"
        "# dumpsys stand-in of the loopback ADB daemon\n"
        'case "${1-}" in\n'
        f"{cases}"
        f"  '') printf 'Currently running services:\\n{listing}' ;;\n"
        "  *) printf \"Can't find service: %s\\n\" \"$1\" ;;\n"
        "esac\n"
    )


# ----------------------------------------------------------------------------- daemon


class LoopbackAdbDaemon:
    """A device-side ADB daemon on 127.0.0.1 serving `root` as `/data/local/tmp`.

    Use it as a context manager; `host` and `port` are set once it has started.
    """

    def __init__(
        self,
        root: os.PathLike | str,
        *,
        auth: str = "accept",
        authorized_keys: Iterable[str] = (),
        props: Mapping[str, str] | None = None,
        battery: Mapping[str, object] | None = None,
        services: Mapping[str, str] | None = None,
        faults: Faults = Faults(),
    ):
        if auth not in _AUTH_MODES:
            raise ValueError(f"`auth` must be one of {_AUTH_MODES}. Received: auth={auth!r}.")
        if isinstance(authorized_keys, str):
            raise ValueError("`authorized_keys` must be a list of public key lines, not one string.")
        if not isinstance(faults, Faults):
            raise ValueError(f"`faults` must be a Faults. Received: faults={faults!r}.")
        root_path = Path(root).resolve()
        if not _SHELL_SAFE_PATH.fullmatch(str(root_path)):
            raise ValueError(
                "`root` must be a path of letters, digits and `_./+-` only (it is spliced into shell commands). "
                f"Received: root={str(root_path)!r}."
            )
        self.root = root_path
        self.remote_root = REMOTE_ROOT
        self.auth = auth
        self.faults = faults
        self.props = {**DEFAULT_PROPS, **(props or {})}
        self.battery = {**DEFAULT_BATTERY, **(battery or {})}
        self.services = {**DEFAULT_SERVICES, **(services or {})}
        bad = [name for name in self.services if name == "battery" or not re.fullmatch(r"[a-z_]+", name)]
        if bad:
            raise ValueError(f"`services` names dumpsys services of lower-case letters other than battery (set "
                             f"`battery` for that). Received: {bad!r}.")
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._keys = [parse_adb_public_key(line) for text in authorized_keys for line in text.splitlines() if line.strip()]
        self._keys_lock = threading.Lock()
        self._connection_count = 0
        self._open: set[_Connection] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._process_groups: list[subprocess.Popen] = []
        self._listener: socket.socket | None = None
        self._private: Path | None = None
        self._final_models_run = 0

    # --- public

    def __enter__(self) -> LoopbackAdbDaemon:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def connections(self) -> int:
        """Transport connections accepted so far."""
        with self._lock:
            return self._connection_count

    @property
    def models_run(self) -> int:
        """Models the `benchmark_model` stand-in has run through this daemon so far."""
        if self._private is None or not self._private.exists():
            return self._final_models_run
        counter = self._private / "state" / _MODELS_RUN_FILE  # replaced atomically by the stand-in
        return int(counter.read_text()) if counter.exists() else 0

    @property
    def serial(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("This LoopbackAdbDaemon is already started.")
        self.root.mkdir(parents=True, exist_ok=True)
        self._private = Path(tempfile.mkdtemp(prefix="loopback-adbd-")).resolve()
        if not _SHELL_SAFE_PATH.fullmatch(str(self._private)):
            raise ValueError(f"The temporary directory must be a shell-safe path. Received: {self._private}.")
        self._install_device_files()
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop, "adb-accept")
        if self.faults.drop_after_models is not None:
            self._spawn(self._watch_drop_requests, "adb-drop-watch")
        _LOG.debug("loopback adbd on %s, root %s", self.serial, self.root)

    def close(self) -> None:
        """Stop listening, reset every connection, kill every command started, remove our files."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        self._drop_all()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)
        with self._lock:
            groups = list(self._process_groups)
        for process in groups:
            _signal_group(process, signal.SIGKILL)
        _kill_sessions(groups)
        for process in groups:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        if self._private is not None and self._private.exists():
            self._final_models_run = self.models_run
            shutil.rmtree(self._private, ignore_errors=True)

    # --- used by connections

    @property
    def banner(self) -> bytes:
        p = self.props
        return (
            f"device::ro.product.name={p['ro.product.name']};ro.product.model={p['ro.product.model']};"
            f"ro.product.device={p['ro.product.device']};features={','.join(_FEATURES)}"
        ).encode()

    def _authorized_keys(self) -> list[_RsaPublicKey]:
        with self._keys_lock:
            return list(self._keys)

    def _authorize(self, key: _RsaPublicKey) -> None:
        with self._keys_lock:
            if key not in self._keys:
                self._keys.append(key)

    def _service_for(self, service: str) -> Callable[[_Stream], None] | None:
        kind, colon, argument = service.partition(":")
        if not colon:
            return None
        if kind in ("shell", "exec"):
            return lambda stream: _run_shell(self, argument, stream)
        if kind == "sync" and not argument:
            return lambda stream: _SyncSession(self, stream).run()
        return None

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._open.discard(connection)

    def _started(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._process_groups.append(process)

    # --- internals

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        with self._lock:
            self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connection_count += 1
                connection = _Connection(self, sock, self._connection_count)
                self._open.add(connection)
            self._spawn(connection.serve, f"adb-conn-{connection.number}")

    def _watch_drop_requests(self) -> None:
        state = self._private / "state"
        while not self._stopping.wait(0.02):
            if (state / _DROP_REQUEST_FILE).exists():
                _LOG.debug("dropping every connection after %d models", self.models_run)
                self._drop_all()  # returns once every dropped connection's groups got SIGHUP
                (state / _DROP_DONE_FILE).touch()
                return

    def _drop_all(self) -> None:
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            connection.abort()

    def _install_device_files(self) -> None:
        private = self._private
        state, bin_dir, sysfs = private / "state", private / "bin", private / "sysfs_cpu"
        thermal = private / "sysfs_thermal"
        state.mkdir()
        listing = state / "props.txt"
        _write(listing, "".join(f"[{k}]: [{v}]\n" for k, v in sorted(self.props.items())))
        _write(bin_dir / "getprop", _getprop_script(self.props, listing), 0o755)
        outputs = {"battery": state / "dumpsys_battery.txt"}
        _write(outputs["battery"], _battery_text(self.battery))
        for name, text in self.services.items():
            outputs[name] = state / f"dumpsys_{name}.txt"
            _write(outputs[name], text)
        _write(bin_dir / "dumpsys", _dumpsys_script(outputs), 0o755)
        _make_sysfs_cpu(sysfs)
        _make_sysfs_thermal(thermal)
        self._paths = _PathMap(self.root, sysfs, thermal)
        fault_spec = {**dataclasses.asdict(self.faults), "state_dir": str(state)}
        self._shell_env = {
            **os.environ,
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), str(bin_dir), os.environ.get("PATH", os.defpath)]),
            "TMPDIR": str(self.root),
            FAKE_BENCHMARK_ENV: json.dumps(fault_spec),
        }

