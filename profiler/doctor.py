"""Check a phone before an hours-long LUT build: one line per check, each with its fix.

    python -m profiler.doctor --device pixel [--backend cpu|gpu|nnapi|both] [--devices FILE] [--json]

The checks are a table (`CHECKS`): small functions of what the phone says, each returning a
`CheckResult` (name, ok / warn / fail / skip, what was found, what was expected, the fix).  A
check whose prerequisite failed is skipped, so one fault gives one failing line.  The phone is
reached the way a LUT build reaches it: the same `Connection` (auth, one-line errors), the
same facts command and ABI check (`profiler.adb.phone`), and the probe model runs through a
real `AdbDevice`, which installs benchmark_model and the batch runner as a build does (so the
build that follows pushes nothing) and runs the probe with the batch runner.

Readiness (exit 0 ready, 2 not ready).  A check fails only where a build would be impossible
or its LUT wrong:

* impossible: no connection or a refused key; no benchmark_model file; a benchmark_model for
  another ABI; too little free space in `remote_dir` for the batches; a shell without the
  runner's tools; benchmark_model not running the CPU probe; a requested GPU or NNAPI whose
  delegate does not take the probe's whole graph (every entry would fail); a low battery that is
  not charging (the phone stops, or battery saver caps it, mid-build);
* wrong LUT: a battery at 40 °C or more, or a thermal status above none (the phone is already
  throttling: the LUT would hold throttled latencies, and the conditions monitor would take
  them for the quiet value); battery saver on (it caps the CPU).

Warnings are shown but leave the phone ready: a governor other than `performance` (normal
without root; the conditions monitor watches drift), a cluster's maximum frequency capped
below its hardware maximum, a battery of 35 °C or more, not charging, the screen on, no
`timeout --foreground`, XNNPACK asked for but not reported, and what the phone does not say.

The doctor installs into `remote_dir` and removes old sessions there, as a build does: do not
run it while a build is running on the same phone.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import re
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

from lut.cli import EXIT_BAD_INPUT, EXIT_OK, ArgumentParser, run_parsed
from lut.quiet_tf import import_tensorflow_quietly
from lut.table import MeasurementFailure
from profiler.adb.connection import CONNECTION_ERRORS, SETUP_TIMEOUT_S, Connection, reason
from profiler.adb.device import SWEEP_BYTES, AdbDevice
from profiler.adb.phone import FACTS_COMMAND, binary_abis, check_abi, parse_phone, phone_abis
from profiler.adb.records import RunnerRecord, result_from_record
from profiler.benchmark_output import BenchmarkResult, parse_benchmark_output
from profiler.convert import keras_to_tflite
from profiler.device_config import BACKENDS, AdbSettings, load_device_configs
from profiler.errors import ProfilerError

__all__ = [
    "CHECKS",
    "FAIL",
    "OK",
    "SKIP",
    "WARN",
    "Check",
    "CheckResult",
    "Battery",
    "main",
    "parse_battery",
    "parse_sections",
    "run_checks",
]

PROG = "python -m profiler.doctor"
OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_LABELS = {OK: "ok", WARN: "WARN", FAIL: "FAIL", SKIP: "skip"}
_NAME_WIDTH = 20
HOT_BATTERY_C = 40.0  # and above: throttled figures (fail)
WARM_BATTERY_C = 35.0  # and above: a warning
LOW_BATTERY_PCT = 20  # below, and not charging: the build may not finish (fail)
_PROBE_ID = "doctor_probe"
_THERMAL_STATUSES = ("none", "light", "moderate", "severe", "critical", "emergency", "shutdown")
_SECTION_MARK = "PHONEFIT_DOCTOR"
_RUNNER_TOOLS = ("sh", "tar", "timeout", "sleep", "sha256sum", "taskset")
_VERSION_RE = re.compile(r"\bversion\b\W*(v?\d+\.\d+[\w.+-]*)", re.IGNORECASE)


# ---------------------------------------------------------------- results and the table
@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One check's verdict: `status` is ok, warn, fail or skip; `observed` what the phone said."""

    name: str
    status: str
    observed: str
    expected: str = ""
    fix: str = ""

    def line(self) -> str:
        text = self.observed
        if self.status in (WARN, FAIL):
            text += f"; expected {self.expected}" if self.expected else ""
            text += f". Fix: {self.fix}" if self.fix else ""
        return f"{_LABELS[self.status]:<4}  {self.name:<{_NAME_WIDTH}}  {text}"


def _ok(observed: str) -> CheckResult:
    return CheckResult("", OK, observed)


def _warn(observed: str, expected: str, fix: str) -> CheckResult:
    return CheckResult("", WARN, observed, expected, fix)


def _fail(observed: str, expected: str = "", fix: str = "") -> CheckResult:
    return CheckResult("", FAIL, observed, expected, fix)


@dataclasses.dataclass(frozen=True)
class Check:
    """A row of the table: `run` is skipped unless every check in `needs` passed (ok or warn),
    and left out unless `applies` (e.g. the GPU's check when no GPU is asked for)."""

    name: str
    run: Callable[[_Phone], CheckResult]
    needs: tuple[str, ...] = ()
    applies: Callable[[_Phone], bool] = lambda phone: True


# ---------------------------------------------------------------- what the phone says
def _section_command(settings: AdbSettings) -> str:
    """One shell call for what the facts command does not ask: each part after a marker line."""
    remote = settings.remote_dir  # letters, digits and ._/- only (devices.toml's check): safe unquoted
    parts = {
        # the remote directory may not exist yet: its nearest existing parent's file system
        "space": f'd={remote}; while [ ! -d "$d" ]; do d=${{d%/*}}; done; df -kP "$d" 2>&1',
        "tools": (f'for t in {" ".join(_RUNNER_TOOLS)}; do echo "$t=$(command -v $t 2>/dev/null)"; done; '
                  'timeout --foreground 5 sleep 0 </dev/null >/dev/null 2>&1 && echo foreground=yes; '
                  'echo "ksh=${KSH_VERSION-}"'),
        "freq": ('for d in /sys/devices/system/cpu/cpufreq/policy*; do [ -d "$d" ] && '
                 'echo "${d##*/}=$(cat $d/scaling_cur_freq 2>/dev/null)"; done'),
        "power": "dumpsys power 2>/dev/null | grep -E 'mWakefulness=|mLowPowerMode=|Display Power'",
        "display": "dumpsys display 2>/dev/null | grep -E 'mScreenState='",
        "thermal": "dumpsys thermalservice 2>/dev/null | grep -E 'Thermal Status'",
        "zones": ('for z in /sys/class/thermal/thermal_zone*; do [ -r "$z/temp" ] && '
                  'echo "$(cat $z/type 2>/dev/null)=$(cat $z/temp 2>/dev/null)"; done'),
    }
    return "; ".join(f"echo {_SECTION_MARK} {name}; {command}" for name, command in parts.items()) + "; true"


def parse_sections(output: str) -> dict[str, str]:
    """The output of the doctor's shell call, by part (`space`, `tools`, `power`, …)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(f"{_SECTION_MARK} "):
            current = sections.setdefault(line.split(" ", 1)[1].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def _pairs(text: str) -> dict[str, str]:
    """`key=value` lines (the last `=` splits: zone types may hold none, values never do)."""
    pairs = {}
    for line in text.splitlines():
        key, sep, value = line.strip().rpartition("=")
        if sep and key:
            pairs[key] = value.strip()
    return pairs


@dataclasses.dataclass(frozen=True)
class Battery:
    """What `dumpsys battery` says of the charge: percent (None: not said), whether it charges, from what."""

    percent: int | None
    charging: bool
    sources: tuple[str, ...]


def parse_battery(output: str) -> Battery:
    """`dumpsys battery`'s `level`/`scale`, `status` (2 charging, 5 full) and `… powered: true` lines."""
    fields = dict(re.findall(r"^\s*([A-Za-z ]+):\s*(\S.*?)\s*$", output, re.MULTILINE))

    def number(key: str) -> int | None:
        text = fields.get(key, "")
        return int(text) if text.isdigit() else None

    level, scale = number("level"), number("scale") or 100
    sources = tuple(s for s in ("AC", "USB", "Wireless", "Dock") if fields.get(f"{s} powered") == "true")
    return Battery(None if level is None else round(100 * level / scale), bool(sources) or number("status") in (2, 5),
                   sources)


# ---------------------------------------------------------------- the phone under test
class _Phone:
    """What the checks share: the phone's settings, one connection, what it said (asked once)."""

    def __init__(self, settings: AdbSettings, backends: Sequence[str]):
        self.settings = settings
        self.backends = ("cpu", *(b for b in BACKENDS if b != "cpu" and b in backends))  # the CPU always
        self._link: Connection | None = None
        self._probes: dict[str, RunnerRecord | ProfilerError] = {}

    @property
    def link(self) -> Connection:
        if self._link is None:
            self._link = Connection(self.settings)
        return self._link

    def shell(self, command: str) -> str:
        link = self.link
        output: str = link.retrying(lambda: link.adb.shell(command, transport_timeout_s=SETUP_TIMEOUT_S))
        return output

    @functools.cached_property
    def binary(self) -> bytes:
        return self.settings.benchmark_model.read_bytes()

    @functools.cached_property
    def facts_text(self) -> str:
        return self.shell(FACTS_COMMAND)  # what a build's fingerprint is made of

    @functools.cached_property
    def facts(self) -> dict[str, object]:
        return parse_phone(self.facts_text)

    @functools.cached_property
    def sections(self) -> dict[str, str]:
        return parse_sections(self.shell(_section_command(self.settings)))

    def probe(self, backend: str) -> RunnerRecord:
        """The probe model's record, run by the batch runner through a build's `AdbDevice`."""
        if backend not in self._probes:
            try:
                self._probes[backend] = _run_probe(self.settings, backend)
            except ProfilerError as e:
                self._probes[backend] = e
        result = self._probes[backend]
        if isinstance(result, ProfilerError):
            raise result
        return result

    def close(self) -> None:
        if self._link is not None:
            self._link.close()


@functools.cache
def probe_model() -> bytes:
    """A 3×3 convolution on 16×16×8 (relu6): a layer every backend's delegate takes whole."""
    import_tensorflow_quietly()
    import keras  # TensorFlow takes seconds to import: only a doctor that runs the probe pays for it

    inputs = keras.Input((16, 16, 8))
    return keras_to_tflite(keras.Model(inputs, keras.layers.Conv2D(8, 3, padding="same", activation="relu6")(inputs)))


def _run_probe(settings: AdbSettings, backend: str) -> RunnerRecord:
    model = probe_model()
    device = AdbDevice(settings, backend)
    try:
        [record] = device.run_records([(_PROBE_ID, model)])
    finally:
        device.close()
    if record is None:
        raise ProfilerError("the batch runner left no record of the probe model")
    return record


# ---------------------------------------------------------------- the checks
def _check_connection(phone: _Phone) -> CheckResult:
    phone.link.connect_first()
    return _ok(f"{phone.settings.address}: connected, this computer's ADB key {phone.settings.adb_key}.pub accepted")


def _check_benchmark_file(phone: _Phone) -> CheckResult:
    path, name = phone.settings.benchmark_model, phone.settings.name
    try:
        data = phone.binary
    except OSError as e:
        return _fail(
            f"no benchmark_model at {path} ({e.strerror})",
            "TFLite's benchmark_model built for the phone, at the path `benchmark_model` names",
            f"download android_aarch64_benchmark_model (android_bench/README.md, section 1) and set `benchmark_model` "
            f"of [{name}] in {phone.settings.source} to its path",
        )
    size = f"{len(data) / 2**20:.1f} MiB" if len(data) >= 2**20 else f"{len(data) / 1024:.0f} KiB"
    return _ok(f"{path}: {size}, sha256 {hashlib.sha256(data).hexdigest()[:16]}")


def _check_abi(phone: _Phone) -> CheckResult:
    settings, abis = phone.settings, phone_abis(phone.facts)
    check_abi(phone.binary, phone.facts, name=settings.name, path=settings.benchmark_model, source=settings.source)
    built_for = binary_abis(phone.binary)
    binary = f"benchmark_model built for {built_for[0]}" if built_for else "benchmark_model not an ELF executable (its ABI not checked)"
    if not abis:
        return _warn(f"the phone reports no ABI (ro.product.cpu.abilist); {binary}", "an ABI from getprop",
                     "check `adb shell getprop ro.product.cpu.abilist`")
    return _ok(f"phone runs {', '.join(abis)}; {binary}")


def _check_free_space(phone: _Phone) -> CheckResult:
    settings = phone.settings
    lines = [line.split() for line in phone.sections.get("space", "").splitlines()]
    free = [int(fields[3]) * 1024 for fields in lines if len(fields) >= 6 and fields[3].isdigit()]
    need = SWEEP_BYTES + int(2 * settings.batch_mib * 2**20) + len(phone.binary) + 16 * 2**20
    expected = (f"at least {need / 2**20:.0f} MiB ({SWEEP_BYTES // 2**20} MiB of earlier batches, 2 × batch_mib for "
                "the next one, benchmark_model)")
    if not free:
        return _fail(f"`df -kP` in {settings.remote_dir} printed no free space: {phone.sections.get('space', '')[:120]!r}",
                     expected, "check that the phone's shell has df (toybox)")
    if free[-1] < need:
        return _fail(f"{free[-1] / 2**20:.0f} MiB free for {settings.remote_dir}", expected,
                     f"free space on the phone's /data (apps' caches, downloads), or lower `batch_mib` of [{settings.name}]")
    return _ok(f"{free[-1] / 2**30:.1f} GiB free for {settings.remote_dir} (a build needs {need / 2**20:.0f} MiB)")


def _check_runner_shell(phone: _Phone) -> CheckResult:
    tools = _pairs(phone.sections.get("tools", ""))
    masks = [phone.settings.backend(b).taskset for b in phone.backends]
    needed = [t for t in _RUNNER_TOOLS if t != "taskset" or any(masks)]
    missing = [t for t in needed if not tools.get(t)]
    shell = f"sh = {tools.get('sh') or '?'}" + (f" ({tools['ksh']})" if tools.get("ksh") else "")
    tools_text = ", ".join(t for t in needed if t != "sh")
    if missing:
        return _fail(f"{shell}; no {', '.join(missing)}",
                     f"the runner's tools ({', '.join(needed)}) on the phone's PATH",
                     "use a phone with toybox (Android 6 or later), or put those tools on the shell's PATH")
    if tools.get("foreground") != "yes":
        return _warn(f"{shell}; {tools_text} found; timeout has no --foreground", "timeout --foreground",
                     "none needed: the runner goes on without it, but a benchmark may outlive a dropped connection")
    return _ok(f"{shell}; {tools_text} found; timeout has --foreground")


def _check_benchmark_runs(phone: _Phone) -> CheckResult:
    record = phone.probe("cpu")
    result, _ = result_from_record(record, "cpu", phone.settings.cpu.model_timeout_s)
    if isinstance(result, MeasurementFailure):
        return _fail(f"the probe model on the CPU: {result.error}", "a measured probe",
                     "check benchmark_model runs on the phone: "
                     f"adb shell {phone.settings.remote_dir}/benchmark_model --graph=... (android_bench/README.md)")
    versions = _VERSION_RE.findall(record.output)
    version = f"version {versions[0]}" if versions else "prints no version"
    return _ok(f"runs on the phone ({version}; sha256 {hashlib.sha256(phone.binary).hexdigest()[:16]} is what LUTs record)")


def _check_cpu_delegate(phone: _Phone) -> CheckResult:
    record = phone.probe("cpu")
    parsed = parse_benchmark_output(record.output)  # measured: `benchmark_model runs` passed
    flags = phone.settings.cpu.flags
    xnnpack = next((line.strip() for line in record.output.splitlines() if "XNNPACK delegate" in line), None)
    timing = f"probe {_timing(parsed)}"
    if any(f in ("--use_xnnpack=false", "--use_xnnpack=0") for f in flags):
        return _ok(f"{timing}, TFLite's built-in kernels (--use_xnnpack=false)")
    if xnnpack:
        return _ok(f"{timing}, XNNPACK applied ({xnnpack!r})")
    if any(f in ("--use_xnnpack=true", "--use_xnnpack=1") for f in flags):
        return _warn(f"{timing}, but benchmark_model did not report the XNNPACK delegate", "'… XNNPACK delegate for CPU'",
                     "use a benchmark_model build with XNNPACK (the nightly has it): the LUT records delegate xnnpack")
    return _ok(f"{timing}, default kernels")


# backend -> (the delegate's name, its flag, what else makes it take a graph): the delegate checks.
_DELEGATE_CHECKS = {
    "gpu": ("GPU", "--use_gpu=true", "use a benchmark_model build with the GPU delegate (the nightly has it) on a "
            "phone with OpenCL or OpenGL ES 3.1, or build the CPU LUT only (--backend cpu)"),
    "nnapi": ("NNAPI", "--use_nnapi=true", "set its `accelerator` to one benchmark_model lists (`NNAPI accelerators "
              "available: [...]`) or leave it out, on Android 8.1 or later; or measure the CPU or GPU instead"),
}


def _check_delegate(backend: str, phone: _Phone) -> CheckResult:
    settings = phone.settings
    name, flag, fix = _DELEGATE_CHECKS[backend]
    record = phone.probe(backend)
    result, fault = result_from_record(record, backend, settings.backend(backend).model_timeout_s)
    if fault and isinstance(result, MeasurementFailure):
        return _fail(f"the probe with [{settings.name}.{backend}] flags: {result.error}", "a measured probe",
                     f"check the flags of [{settings.name}.{backend}] in {settings.source}")
    parsed = parse_benchmark_output(record.output)
    verdict, line = getattr(parsed, f"{backend}_delegate"), getattr(parsed, f"{backend}_delegate_line")
    if verdict == "full":
        return _ok(f"probe {_timing(parsed)}, whole graph on the {name} delegate")
    evidence = f" ({line!r})" if line else ""
    return _fail(f"the {name} delegate did not take the probe's graph: delegation {verdict or 'not mentioned'}{evidence}",
                 "delegation full", f"check [{settings.name}.{backend}] flags has {flag}, {fix}")


def _delegate_row(backend: str) -> Check:
    """The table's row that probes `backend`'s delegate, left out unless that backend is asked for."""
    def applies(phone: _Phone) -> bool:
        return backend in phone.backends

    return Check(f"{backend} delegate", functools.partial(_check_delegate, backend), needs=("benchmark_model runs",),
                 applies=applies)


def _check_governor(phone: _Phone) -> CheckResult:
    listed = phone.facts.get("cpu_clusters")
    clusters = [c for c in listed if isinstance(c, dict)] if isinstance(listed, list) else []
    if not clusters:
        return _warn("no cpufreq policies readable", "/sys/devices/system/cpu/cpufreq/policy*",
                     "none: the LUT's fingerprint will miss the clusters' governors and frequencies")
    current = _pairs(phone.sections.get("freq", ""))
    described, capped = [], []
    for c in clusters:
        top, limit, now = c.get("max_khz"), c.get("scaling_max_khz"), current.get(str(c["policy"]), "")
        at = f"{int(now) // 1000}" if now.isdigit() else "?"
        described.append(f"{c['policy']} {c.get('governor') or '?'} at {at} of {_mhz(top)} MHz")
        if isinstance(top, int) and isinstance(limit, int) and limit < top:
            capped.append(f"{c['policy']} capped at {_mhz(limit)} of {_mhz(top)} MHz")
    observed = "; ".join(described)
    if capped:
        return _warn(f"{observed}: {', '.join(capped)}", "scaling_max_freq = cpuinfo_max_freq",
                     "let the phone cool and turn power-saving modes off; a capped cluster's latencies are what the LUT records")
    governors = {c.get("governor") for c in clusters}
    if governors != {"performance"}:
        return _warn(observed, "governor performance",
                     "on a rooted phone: echo performance > /sys/devices/system/cpu/cpufreq/policy*/scaling_governor; "
                     "without root leave it: the conditions monitor measures again what drifts")
    return _ok(observed)


def _check_battery_temperature(phone: _Phone) -> CheckResult:
    temperature = phone.facts.get("battery_temp_c")
    if not isinstance(temperature, float):
        return _warn("dumpsys battery printed no temperature", "a battery temperature",
                     "none: the LUT's fingerprint will miss it")
    observed = f"battery at {temperature:.1f} °C"
    cool = "let the phone cool (screen off, off the charger's fast mode, out of the sun) and run the doctor again"
    if temperature >= HOT_BATTERY_C:
        return _fail(f"{observed}: hot, the phone throttles", f"below {HOT_BATTERY_C:.0f} °C", cool)
    if temperature >= WARM_BATTERY_C:
        return _warn(f"{observed}: warm", f"below {WARM_BATTERY_C:.0f} °C", cool)
    return _ok(observed)


def _check_thermal_status(phone: _Phone) -> CheckResult:
    match = re.search(r"Thermal Status:\s*(\d+)", phone.sections.get("thermal", ""))
    zones = []
    for kind, text in _pairs(phone.sections.get("zones", "")).items():
        if text.lstrip("-").isdigit():
            value = int(text)
            zones.append((value / 1000 if abs(value) >= 1000 else float(value), kind))
    hottest = f"; hottest zone {max(zones)[1]} at {max(zones)[0]:.1f} °C" if zones else "; thermal zones not readable"
    if match is None:
        return _warn(f"dumpsys thermalservice gave no thermal status{hottest}", "Thermal Status: 0 (Android 10 and later)",
                     "none on Android 9 and earlier; else check the phone is cool to the touch")
    status = int(match.group(1))
    name = _THERMAL_STATUSES[status] if status < len(_THERMAL_STATUSES) else "unknown"
    observed = f"thermal status {status} ({name}){hottest}"
    if status > 0:
        return _fail(f"{observed}: the phone is throttling", "thermal status 0 (none)",
                     "let the phone cool (screen off, off the charger, out of the sun) and run the doctor again")
    return _ok(observed)


def _check_battery(phone: _Phone) -> CheckResult:
    battery = parse_battery(phone.facts_text)  # the facts end with `dumpsys battery`
    percent, charging = battery.percent, battery.charging
    observed = (f"{percent} %" if percent is not None else "level unknown") + (
        f", charging ({', '.join(battery.sources) or 'status'})" if charging else ", not charging")
    if "mLowPowerMode=true" in phone.sections.get("power", ""):
        return _fail(f"{observed}, battery saver on: it caps the CPU", "battery saver off",
                     "turn battery saver off (quick settings) and plug the phone in")
    if not charging and percent is not None and percent < LOW_BATTERY_PCT:
        return _fail(observed, f"charging, or at least {LOW_BATTERY_PCT} %",
                     "plug the phone in: a build takes hours, and battery saver (which caps the CPU) starts near 15 %")
    if not charging:
        return _warn(observed, "charging", "plug the phone in (a USB port or a slow charger: fast charging heats it)")
    return _ok(observed)


def _check_screen(phone: _Phone) -> CheckResult:
    power, display = phone.sections.get("power", ""), phone.sections.get("display", "")
    found = re.search(r"mScreenState=(\w+)", display) or re.search(r"Display Power: state=(\w+)", power)
    awake = re.search(r"mWakefulness=(\w+)", power)
    if found is None and awake is None:
        return _warn("dumpsys display and dumpsys power said nothing of the screen", "the screen off",
                     "turn the screen off by hand (power button)")
    state = found.group(1).upper() if found else ""
    observed = f"screen {state or '?'}" + (f", {awake.group(1).lower()}" if awake else "")
    if state == "ON" or (not state and awake and awake.group(1) == "Awake"):
        return _warn(observed, "the screen off",
                     "turn the screen off (power button; ADB goes on): the display and its compositor compete with "
                     "the measured models and heat the phone")
    return _ok(observed)


def _timing(parsed: BenchmarkResult) -> str:
    return f"{parsed.avg_us:.0f} µs avg over {parsed.count} runs"


def _mhz(khz: object) -> str:
    return str(khz // 1000) if isinstance(khz, int) else "?"


CHECKS: tuple[Check, ...] = (
    Check("connection", _check_connection),
    Check("benchmark_model", _check_benchmark_file),
    Check("abi", _check_abi, needs=("connection", "benchmark_model")),
    Check("free space", _check_free_space, needs=("connection", "benchmark_model")),
    Check("runner shell", _check_runner_shell, needs=("connection",)),
    Check("benchmark_model runs", _check_benchmark_runs, needs=("abi", "free space", "runner shell")),
    Check("cpu delegate", _check_cpu_delegate, needs=("benchmark_model runs",)),
    *(_delegate_row(backend) for backend in _DELEGATE_CHECKS),
    Check("cpu governor", _check_governor, needs=("connection",)),
    Check("battery temperature", _check_battery_temperature, needs=("connection",)),
    Check("thermal status", _check_thermal_status, needs=("connection",)),
    Check("battery", _check_battery, needs=("connection",)),
    Check("screen", _check_screen, needs=("connection",)),
)


# ---------------------------------------------------------------- running
def run_checks(phone: _Phone, checks: Sequence[Check] = CHECKS,
               report: Callable[[CheckResult], None] = lambda result: None) -> list[CheckResult]:
    """Every check that applies, in order, a failed prerequisite skipping what needs it;
    `report` sees each result as it comes (the doctor's progress)."""
    results: dict[str, CheckResult] = {}
    for check in checks:
        if not check.applies(phone):
            continue
        blocked = [need for need in check.needs if need in results and results[need].status in (FAIL, SKIP)]
        if blocked:
            result = CheckResult(check.name, SKIP, f"not checked: needs {', '.join(blocked)}")
        else:
            result = dataclasses.replace(_run_one(check, phone), name=check.name)
        results[check.name] = result
        report(result)
    return list(results.values())


def _run_one(check: Check, phone: _Phone) -> CheckResult:
    try:
        return check.run(phone)
    except ProfilerError as e:  # the one-line errors of the connection, the ABI check, the install
        return _fail(str(e).strip())
    except CONNECTION_ERRORS as e:
        return _fail(f"the connection to {phone.settings.address} dropped ({reason(e)})", "a steady connection",
                     "check the phone stays reachable (cable, Wi-Fi, that it does not sleep its radio) and run the doctor again")


def _settings(args: argparse.Namespace) -> AdbSettings:
    if args.device == "host":
        raise ProfilerError("The doctor checks phones; `host` is this computer. Received: --device host. "
                            "Name a phone of devices.toml.")
    configs = load_device_configs(args.devices)
    if args.device not in configs:
        known = ", ".join(sorted(configs)) or "none"
        raise ProfilerError(f"Unknown device {args.device!r}; expected a phone of devices.toml. Known phones: {known}. "
                            f"Received: --device {args.device}. Add it to devices.toml (see devices.example.toml).")
    settings = configs[args.device]["settings"]
    assert isinstance(settings, AdbSettings)
    return settings


def _entry_tables(settings: AdbSettings) -> tuple[str, ...]:
    """The backends the phone's devices.toml entry has a table for ([NAME.gpu], [NAME.nnapi])."""
    try:
        entry = tomllib.loads(Path(settings.source).read_text(encoding="utf-8")).get(settings.name, {})
    except (OSError, tomllib.TOMLDecodeError):
        return ()
    return tuple(b for b in BACKENDS if isinstance(entry, dict) and isinstance(entry.get(b), dict))


def _doctor(args: argparse.Namespace) -> int:
    settings = _settings(args)
    asked = {"both": ("cpu", "gpu"), None: _entry_tables(settings)}.get(args.backend, (args.backend,))
    phone = _Phone(settings, asked)
    if not args.json:
        print(f"{settings.name} ({settings.address}), backends: {', '.join(phone.backends)}", flush=True)
    try:
        results = run_checks(phone, report=(lambda r: None) if args.json else (lambda r: print(r.line(), flush=True)))
    finally:
        phone.close()
    failed = [r.name for r in results if r.status == FAIL]
    warnings = sum(r.status == WARN for r in results)
    if args.json:
        print(json.dumps({"device": settings.name, "address": settings.address, "ready": not failed,
                          "checks": [dataclasses.asdict(r) for r in results]}, indent=2))
    if failed:
        print(f"{PROG}: error: {settings.name} is not ready for a LUT build: {len(failed)} check(s) failed "
              f"({', '.join(failed)}). Fix what their lines say and run the doctor again.", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.json:
        print(f"{settings.name} is ready for a LUT build ({warnings} warning(s)).")
    return EXIT_OK


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description=(
            "Check a phone of devices.toml before a LUT build: connection and key, ABI, free space, the runner's "
            "shell, benchmark_model on a probe model with each backend's delegate, CPU governor and frequencies, "
            "battery temperature and thermal status, battery level and charging, screen. One line per check "
            "(ok, WARN, FAIL, skip) with its fix. Exit 0: ready (warnings allowed); 2: a check failed that makes a "
            "build impossible or its LUT wrong (or bad input)."
        ),
        epilog="It installs benchmark_model as a build does; do not run it while a build runs on the same phone.",
    )
    parser.add_argument("--device", required=True, help="the phone's name in devices.toml")
    parser.add_argument("--devices", metavar="FILE",
                        help="devices.toml registry (default: ./devices.toml, then ~/.config/phonefit/devices.toml)")
    parser.add_argument("--backend", choices=(*BACKENDS, "both"),
                        help="which delegates to probe ('both': cpu and gpu); the CPU is always probed (default: the "
                             "backends the entry has a [NAME.gpu] or [NAME.nnapi] table for, and cpu)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_parsed(_parser(), argv, _doctor, on_interrupt="nothing was changed but benchmark_model's install; "
                                                            "run the doctor again")


if __name__ == "__main__":
    sys.exit(main())
