"""The `devices.toml` registry of phones, read into frozen `AdbSettings`.

Looked up, first found wins: the `--devices FILE` given, `./devices.toml`, then
`$XDG_CONFIG_HOME/phonefit/devices.toml` (default `~/.config/phonefit/devices.toml`).
One table per phone; `[NAME.cpu]`, `[NAME.gpu]` and `[NAME.nnapi]` hold what differs per
backend, the GPU's and NNAPI's tables also their delegate's own settings::

    [pixel]
    transport = "tcp"                      # or "usb" with serial = "…"
    address = "192.168.1.23:5555"
    benchmark_model = "~/tflite/android_aarch64_benchmark_model"
    [pixel.cpu]
    taskset = "f0"                         # the big cores
    [pixel.gpu]
    precision = "fp16"                     # as apps run it (--gpu_precision_loss_allowed=true); or "fp32"
    gpu_backend = "cl"                     # or "gl"; left out: the delegate chooses
    [pixel.nnapi]
    accelerator = "qti-dsp"                # --nnapi_accelerator_name; left out: NNAPI chooses

Relative paths are relative to the file that names them.  `android_bench/README.md`
documents every field; `devices.example.toml` is a complete example.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from profiler.errors import ProfilerError

__all__ = [
    "BACKENDS",
    "DEFAULT_REMOTE_DIR",
    "AdbSettings",
    "BackendSettings",
    "GROUPS_TABLE",
    "devices_file_candidates",
    "load_device_configs",
    "load_device_groups",
    "parse_adb_settings",
]

DEFAULT_REMOTE_DIR = "/data/local/tmp/phonefit"
# Android's shell user may run binaries only below /data/local/tmp (storage is noexec).
_REMOTE_ROOT = "/data/local/tmp/"
_SAFE_REMOTE_RE = re.compile(r"^/[A-Za-z0-9._/-]+$")
_HEX_MASK_RE = re.compile(r"^(?:0[xX])?[0-9a-fA-F]+$")
_RESERVED_NAMES = ("host",)
GROUPS_TABLE = "groups"  # [groups.NAME] devices = [...]: phones of one model that build one LUT together
_ACCELERATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


BACKENDS = ("cpu", "gpu", "nnapi")  # what a phone measures with: its CPU, the GPU delegate, NNAPI


@dataclasses.dataclass(frozen=True)
class BackendSettings:
    """How `benchmark_model` runs for one backend (cpu, gpu or nnapi) of a phone.

    `precision` and `gpu_backend` are the GPU delegate's, `accelerator` NNAPI's: only their
    backend's table takes them, and `delegate_flags` says them to benchmark_model.
    """

    threads: int | None = None  # the default when the caller does not choose
    taskset: str | None = None  # CPU mask in hex ("f0"), None: no pinning
    flags: tuple[str, ...] = ()  # benchmark_model flags of this backend
    warmup_runs: int = 20
    num_runs: int = 100
    min_secs: float = 0.5
    cooldown_s: float = 1.0
    model_timeout_s: float = 60.0
    precision: str | None = None  # gpu: "fp16" (the default, as apps run it) or "fp32"
    gpu_backend: str | None = None  # gpu: "cl" or "gl"; None: the delegate chooses
    accelerator: str | None = None  # nnapi: the NNAPI device's name; None: NNAPI chooses

    @property
    def delegate_flags(self) -> tuple[str, ...]:
        """The benchmark_model flags of the delegate's settings (`precision` … `accelerator`)."""
        return tuple(flag(value) for field, flag in _DELEGATE_FLAGS.items()
                     if (value := getattr(self, field)) is not None)


# A delegate setting -> its benchmark_model flag (the one way to set that flag).
_DELEGATE_FLAGS: dict[str, Callable[[str], str]] = {
    "precision": lambda v: f"--gpu_precision_loss_allowed={'true' if v == 'fp16' else 'false'}",
    "gpu_backend": lambda v: f"--gpu_backend={v}",
    "accelerator": lambda v: f"--nnapi_accelerator_name={v}",
}
_DEFAULT_BACKENDS = {
    "cpu": BackendSettings(flags=("--use_xnnpack=true",)),
    "gpu": BackendSettings(flags=("--use_gpu=true",), precision="fp16"),
    "nnapi": BackendSettings(flags=("--use_nnapi=true",)),
}


@dataclasses.dataclass(frozen=True)
class AdbSettings:
    """One phone of `devices.toml`, validated."""

    name: str
    source: str  # the devices.toml it came from
    transport: str  # "tcp" or "usb"
    benchmark_model: Path
    host: str | None = None
    port: int | None = None
    serial: str | None = None
    adb_key: Path = Path("~/.android/adbkey").expanduser()
    remote_dir: str = DEFAULT_REMOTE_DIR
    auth_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    batch_size: int = 128
    batch_mib: float = 64.0  # a batch also ends before its models pass this many MiB
    max_consecutive_failures: int = 5
    reconnect_tries: int = 5
    reconnect_backoff_s: float = 1.0
    # the conditions monitor on this phone (`profiler.monitor`; the command's options override):
    drift_every: int = 0  # entries between two measurements of the reference model; 0: once per batch
    drift_pct: float = 10.0
    drift_pause_s: float = 30.0
    drift_max_pauses: int = 3
    ray_node: str | None = None  # in a phone farm: the Ray node (IP address) whose host reaches the phone
    cpu: BackendSettings = _DEFAULT_BACKENDS["cpu"]
    gpu: BackendSettings = _DEFAULT_BACKENDS["gpu"]
    nnapi: BackendSettings = _DEFAULT_BACKENDS["nnapi"]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if self.transport == "tcp" else f"usb:{self.serial or 'any'}"

    def backend(self, name: str) -> BackendSettings:
        if name not in BACKENDS:
            raise ValueError(f"`name` must be one of {', '.join(BACKENDS)}. Received: name={name!r}.")
        settings: BackendSettings = getattr(self, name)
        return settings


# ---------------------------------------------------------------- field checks
def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _non_negative_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _positive_number(value: object) -> bool:
    return _non_negative_number(value) and isinstance(value, int | float) and value > 0


def _hex_mask(value: object) -> bool:
    return isinstance(value, str) and bool(_HEX_MASK_RE.match(value)) and int(value, 16) > 0


def _text(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _flag_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(f, str) and f.startswith("--") and "\n" not in f for f in value)


def _accelerator_name(value: object) -> bool:
    return isinstance(value, str) and bool(_ACCELERATOR_RE.match(value))


# field -> (check, what it must be, convert); one table per level, so checks are data.
_Field = tuple[Callable[[object], bool], str, Callable[[Any], object]]  # convert runs on checked values
_BACKEND_FIELDS: dict[str, _Field] = {
    "threads": (_positive_int, "a positive integer", int),
    "taskset": (_hex_mask, "a non-zero hexadecimal CPU mask such as \"f0\"", lambda v: format(int(v, 16), "x")),
    "flags": (_flag_list, "a list of benchmark_model flags such as [\"--use_gpu=true\"]", tuple),
    "warmup_runs": (_non_negative_int, "a non-negative integer", int),
    "num_runs": (_positive_int, "a positive integer", int),
    "min_secs": (_non_negative_number, "a non-negative number of seconds", float),
    "cooldown_s": (_non_negative_number, "a non-negative number of seconds", float),
    "model_timeout_s": (_positive_number, "a positive number of seconds", float),
}
_DEVICE_FIELDS: dict[str, _Field] = {
    "kind": (lambda v: v == "adb", "\"adb\"", str),
    "transport": (lambda v: v in ("tcp", "usb"), "\"tcp\" or \"usb\"", str),
    "address": (_text, "\"HOST:PORT\" such as \"192.168.1.23:5555\"", str),
    "serial": (_text, "the phone's USB serial number (see `adb devices`)", str),
    "adb_key": (_text, "the path of an ADB private key", str),
    "benchmark_model": (_text, "the local path of benchmark_model built for the phone", str),
    "remote_dir": (lambda v: isinstance(v, str) and _remote_dir_ok(v),
                   f"a directory below {_REMOTE_ROOT} of letters, digits, '.', '_', '-' such as \"{DEFAULT_REMOTE_DIR}\"", str),
    "auth_timeout_s": (_positive_number, "a positive number of seconds", float),
    "connect_timeout_s": (_positive_number, "a positive number of seconds", float),
    "batch_size": (_positive_int, "a positive integer", int),
    "batch_mib": (_positive_number, "a positive number of MiB", float),
    "max_consecutive_failures": (_positive_int, "a positive integer", int),
    "reconnect_tries": (_non_negative_int, "a non-negative integer", int),
    "reconnect_backoff_s": (_non_negative_number, "a non-negative number of seconds", float),
    "drift_every": (_non_negative_int, "a non-negative integer (0: the reference ends every batch)", int),
    "drift_pct": (_positive_number, "a positive percentage", float),
    "drift_pause_s": (_non_negative_number, "a non-negative number of seconds", float),
    "drift_max_pauses": (_non_negative_int, "a non-negative integer", int),
    "ray_node": (_text, "the IP address of the Ray node the phone is attached to (a phone farm's actor runs there)", str),
}
# backend -> its delegate's own settings, which only its table takes (in the order the LUT's
# `delegate` condition names them: `profiler.adb.device`).
_DELEGATE_FIELDS: dict[str, dict[str, _Field]] = {
    "cpu": {},
    "gpu": {
        "precision": (lambda v: v in ("fp16", "fp32"),
                      "\"fp16\" (--gpu_precision_loss_allowed=true, as apps run the GPU delegate) or \"fp32\"", str),
        "gpu_backend": (lambda v: v in ("cl", "gl"), "\"cl\" (OpenCL) or \"gl\" (OpenGL ES); leave it out to let the "
                        "delegate choose", str),
    },
    "nnapi": {
        "accelerator": (_accelerator_name, "an NNAPI device name such as \"qti-dsp\" or \"google-edgetpu\" (benchmark_model "
                        "lists them: `NNAPI accelerators available: [...]`); leave it out to let NNAPI choose", str),
    },
}
# benchmark_model flags phonefit derives from other settings (or from the model).
_FLAGS_SET_BY_PHONEFIT = {
    "--graph": "the model being measured",
    "--num_threads": "the requested threads (--threads)",
    "--warmup_runs": "`warmup_runs`",
    "--num_runs": "`num_runs`",
    "--min_secs": "`min_secs`",
    "--gpu_precision_loss_allowed": "`precision` of the gpu table (\"fp16\": true, \"fp32\": false)",
    "--gpu_backend": "`gpu_backend` of the gpu table",
    "--nnapi_accelerator_name": "`accelerator` of the nnapi table",
}


def _remote_dir_ok(path: str) -> bool:
    parts = path.rstrip("/").split("/")
    return (
        bool(_SAFE_REMOTE_RE.match(path))
        and path.startswith(_REMOTE_ROOT)
        and len(path.rstrip("/")) > len(_REMOTE_ROOT)
        and not any(part in (".", "..") for part in parts)
    )


# ---------------------------------------------------------------- loading
def devices_file_candidates(devices_file: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where `devices.toml` is looked for, in order."""
    if devices_file is not None:
        return [Path(devices_file).expanduser()]
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return [Path("devices.toml"), Path(config_home) / "phonefit" / "devices.toml"]


def _read_registry(path: str | os.PathLike[str] | None) -> tuple[Path | None, dict[str, Any]]:
    """The devices.toml that `path` (or the default places) names, parsed; (None, {}) for none."""
    candidates = devices_file_candidates(path)
    if path is not None and not candidates[0].is_file():
        raise ProfilerError(
            f"No devices file at {candidates[0]}; expected a devices.toml. Received: --devices {path}. "
            "Create it (see devices.example.toml) or drop --devices "
            "to use ./devices.toml or ~/.config/phonefit/devices.toml."
        )
    source = next((c for c in candidates if c.is_file()), None)
    if source is None:
        return None, {}
    try:
        with open(source, "rb") as f:
            return source, tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfilerError(f"{source} is not valid TOML: {e}.") from e
    except UnicodeDecodeError as e:
        raise ProfilerError(
            f"{source} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at position {e.start}); "
            "expected a devices.toml in UTF-8 (see devices.example.toml). Save it as UTF-8."
        ) from e
    except OSError as e:
        raise ProfilerError(f"Cannot read the devices file {source}: {e.strerror}.") from e


def load_device_configs(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, object]]:
    """Every phone of the registry, by name: `{"kind": "adb", "settings": AdbSettings}`.

    With `path` that file must exist; without, the first of `./devices.toml` and the user's
    config file is read, and no file means no phones.  A malformed file raises
    `ProfilerError` naming the file, the entry and the field.
    """
    source, document = _read_registry(path)
    configs: dict[str, dict[str, object]] = {}
    for name, entry in document.items():
        if name != GROUPS_TABLE:
            configs[name] = {"kind": "adb", "settings": parse_adb_settings(name, entry, source=str(source))}
    return configs


def load_device_groups(path: str | os.PathLike[str] | None = None) -> dict[str, tuple[str, ...]]:
    """The registry's groups of phones of one model (`[groups.NAME] devices = [...]`), by name:
    their phones in the order given (the first that is reachable leads: it measures what one
    phone must, such as the invocation overhead and the cache sweep)."""
    source, document = _read_registry(path)
    tables = document.get(GROUPS_TABLE, {})
    if not isinstance(tables, Mapping):
        raise ProfilerError(f"{source}: [{GROUPS_TABLE}] must be a table of groups such as "
                            f"[{GROUPS_TABLE}.pixel7] devices = [\"pixel7-a\", \"pixel7-b\"]. Received: {tables!r}.")
    phones = {name for name in document if name != GROUPS_TABLE}
    groups: dict[str, tuple[str, ...]] = {}
    for name, table in tables.items():
        where = f"{source}: [{GROUPS_TABLE}.{name}]"
        if not re.match(r"^[A-Za-z0-9_-]+$", name) or name in _RESERVED_NAMES or name in phones:
            raise ProfilerError(f"{where}: a group's name uses letters, digits, '_' and '-' and is no phone's name "
                                f"(nor 'host'). Received: {name!r}.")
        if not isinstance(table, Mapping) or set(table) != {"devices"}:
            raise ProfilerError(f"{where} must hold one setting, `devices = [\"phone-a\", \"phone-b\", ...]`. "
                                f"Received: {table!r}.")
        members = table["devices"]
        if (not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members)
                or len(set(members)) != len(members)):
            raise ProfilerError(f"{where}: `devices` must be a non-empty list of distinct phone names. "
                                f"Received: devices={members!r}.")
        unknown = [m for m in members if m not in phones]
        if unknown:
            raise ProfilerError(f"{where}: {', '.join(map(repr, unknown))} is not a phone of {source}. "
                                f"Known phones: {', '.join(sorted(phones)) or 'none'}.")
        groups[name] = tuple(members)
    return groups


def parse_adb_settings(name: str, entry: object, *, source: str = "devices.toml") -> AdbSettings:
    """Validate one `[name]` table into `AdbSettings` (relative paths resolved against `source`)."""
    where = f"{source}: [{name}]"
    if name in _RESERVED_NAMES:
        raise ProfilerError(f"{where}: {name!r} is the built-in device; give the phone another name.")
    if not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise ProfilerError(f"{where}: a device name uses letters, digits, '_' and '-' only. Received: {name!r}.")
    if not isinstance(entry, Mapping):
        raise ProfilerError(f"{where} must be a table of settings. Received: {name} = {entry!r}.")
    # Run settings (all but flags) may sit at the top, for every backend; [name.cpu],
    # [name.gpu] and [name.nnapi] override them.
    shared_keys = [k for k in _BACKEND_FIELDS if k != "flags"]
    shared = _checked(where, {k: v for k, v in entry.items() if k in shared_keys}, _BACKEND_FIELDS)
    values = _checked(where, {k: v for k, v in entry.items() if k not in (*BACKENDS, *shared_keys)}, _DEVICE_FIELDS)
    backends = {}
    for backend in BACKENDS:
        table = entry.get(backend, {})
        if not isinstance(table, Mapping):
            raise ProfilerError(f"{where}: `{backend}` must be a table [{name}.{backend}]. Received: {table!r}.")
        backends[backend] = _backend_settings(f"{source}: [{name}.{backend}]", backend, shared, table)
    base = Path(source).expanduser().resolve().parent
    transport = values.pop("transport", "tcp")
    host = port = None
    if transport == "tcp":
        if "address" not in values:
            raise ProfilerError(
                f"{where}: a tcp phone needs `address = \"HOST:PORT\"` (the port of `adb tcpip 5555` or of wireless "
                "debugging). Received: no `address`."
            )
        host, port = _host_port(where, values.pop("address"))
    elif "serial" not in values and "address" in values:
        raise ProfilerError(f"{where}: a usb phone is chosen by `serial`, not `address`. Received: address={values['address']!r}.")
    if "benchmark_model" not in values:
        raise ProfilerError(
            f"{where}: `benchmark_model` (the local path of TFLite's benchmark_model built for the phone) is required; "
            "android_bench/README.md says how to get it."
        )
    values.pop("kind", None)
    values.pop("address", None)
    return AdbSettings(
        name=name,
        source=source,
        transport=transport,
        host=host,
        port=port,
        benchmark_model=_resolve(base, values.pop("benchmark_model")),
        adb_key=_resolve(base, values.pop("adb_key", "~/.android/adbkey")),
        remote_dir=values.pop("remote_dir", DEFAULT_REMOTE_DIR).rstrip("/"),
        **values,
        cpu=backends["cpu"],
        gpu=backends["gpu"],
        nnapi=backends["nnapi"],
    )


def _backend_settings(where: str, backend: str, shared: Mapping[str, Any], table: Mapping[str, object]) -> BackendSettings:
    values = {**shared, **_checked(where, table, {**_BACKEND_FIELDS, **_DELEGATE_FIELDS[backend]})}
    for flag in values.get("flags", ()):
        name = flag.split("=", 1)[0]
        if name in _FLAGS_SET_BY_PHONEFIT:
            raise ProfilerError(
                f"{where}: `flags` may not set {name}; phonefit sets it from {_FLAGS_SET_BY_PHONEFIT[name]}. "
                f"Received: {flag!r}."
            )
    return dataclasses.replace(_DEFAULT_BACKENDS[backend], **values)


def _checked(where: str, table: Mapping[str, object], fields: dict[str, _Field]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            owner = next((b for b, own in _DELEGATE_FIELDS.items() if key in own), None)
            if owner is not None:
                raise ProfilerError(f"{where}: `{key}` is a setting of the {owner} backend; move it into its table "
                                    f"[NAME.{owner}]. Received: {key}={value!r}.")
            known = list(fields)
            if fields is _DEVICE_FIELDS:  # a phone's table also takes run settings and its backends' tables
                known += [*(k for k in _BACKEND_FIELDS if k != "flags"), *BACKENDS]
            raise ProfilerError(f"{where}: unknown setting {key!r}. Known settings: {', '.join(known)}.")
        check, expected, convert = fields[key]
        if not check(value):
            raise ProfilerError(f"{where}: `{key}` must be {expected}. Received: {key}={value!r}.")
        values[key] = convert(value)
    return values


def _host_port(where: str, address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProfilerError(f"{where}: `address` must be \"HOST:PORT\" such as \"192.168.1.23:5555\". Received: address={address!r}.")
    return host.strip("[]"), int(port)


def _resolve(base: Path, path: str) -> Path:
    expanded = Path(path).expanduser()
    return expanded if expanded.is_absolute() else (base / expanded)
