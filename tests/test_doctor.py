"""`python -m profiler.doctor` against the loopback phone: a healthy phone is ready, and each
fault gives its own failing line and exit 2.

The phone is tests/adb_daemon.py (the real ADB protocol on 127.0.0.1) with the benchmark_model
stand-in tests/fake_benchmark_model.py; faults are its switches: `auth="reject"`, `props`,
`battery`, `services` and `Faults`.  The CLI runs in-process through `main()`.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from profiler.doctor import CHECKS, FAIL, OK, WARN, CheckResult, main, parse_battery, parse_sections
from tests.adb_daemon import DEFAULT_SERVICES, Faults, LoopbackAdbDaemon
from tests.test_adb_device import loop_entry, write_devices_toml

_LINE_RE = re.compile(r"^(ok|WARN|FAIL|skip) +(\S.*?) {2,}(.*)$")
# Checks that are on the phone: skipped when the connection fails.
_PHONE_CHECKS = [c.name for c in CHECKS if c.name not in ("connection", "benchmark_model")]


def _doctor(capsys, tmp_path: Path, daemon: LoopbackAdbDaemon, *args: str, **entry) -> tuple[int, dict, str]:
    """(exit code, {check name: (label, text)}, stderr) of the doctor on the loopback phone."""
    devices = write_devices_toml(tmp_path / "devices.toml", {"loop": loop_entry(tmp_path, daemon, **entry)})
    code = main(["--device", "loop", "--devices", str(devices), *args])
    out, err = capsys.readouterr()
    lines = {m.group(2): (m.group(1), m.group(3)) for m in map(_LINE_RE.match, out.splitlines()) if m}
    return code, lines, err


def _failed(lines: dict) -> list[str]:
    return [name for name, (label, _) in lines.items() if label == "FAIL"]


def _elf_header(machine: int) -> bytes:
    """The 64-byte header of a 64-bit little-endian ELF executable for `machine` (0xB7: AArch64)."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHI", 2, machine, 1) + bytes(64 - 24)


@pytest.fixture
def daemon(tmp_path):
    with LoopbackAdbDaemon(tmp_path / "phone") as running:
        yield running


# ---------------------------------------------------------------- end to end
@pytest.mark.timeout(120)
def test_healthy_phone_is_ready_with_every_check_on_its_line(capsys, tmp_path, daemon):
    code, lines, err = _doctor(capsys, tmp_path, daemon)
    assert code == 0, (lines, err)
    assert err == ""
    assert list(lines) == [c.name for c in CHECKS]  # GPU and NNAPI probed: the entry has [loop.gpu], [loop.nnapi]
    assert {name for name, (label, _) in lines.items() if label != "ok"} == {"cpu governor"}
    assert lines["cpu governor"][1].startswith("policy0 schedutil at 1803 of 1803 MHz; policy4 schedutil")
    assert "expected governor performance" in lines["cpu governor"][1]
    assert lines["gpu delegate"][1].endswith("whole graph on the GPU delegate")
    assert lines["nnapi delegate"][1].endswith("whole graph on the NNAPI delegate")
    assert "XNNPACK applied" in lines["cpu delegate"][1]
    assert lines["abi"][1].startswith("phone runs arm64-v8a, armeabi-v7a, armeabi")
    assert lines["battery temperature"][1] == "battery at 31.2 °C"
    assert lines["battery"][1] == "87 %, charging (USB)"
    assert lines["thermal status"][1] == "thermal status 0 (none); hottest zone cpu-1-0-usr at 38.5 °C"
    assert lines["screen"][1] == "screen OFF, asleep"
    assert "runs on the phone (prints no version; sha256 " in lines["benchmark_model runs"][1]
    # installed as a build installs it: the build that follows pushes nothing; the session is gone
    remote = daemon.root / "phonefit"
    assert (remote / "benchmark_model").read_bytes() == Path(loop_entry(tmp_path, daemon)["benchmark_model"]).read_bytes()
    assert sorted(p.name for p in remote.iterdir()) == ["benchmark_model", "run_batch.sh", "runs"]
    assert list((remote / "runs").iterdir()) == []


@pytest.mark.timeout(60)
def test_rejected_key_fails_the_connection_line_and_skips_the_phone_checks(capsys, tmp_path):
    with LoopbackAdbDaemon(tmp_path / "phone", auth="reject") as daemon:
        code, lines, err = _doctor(capsys, tmp_path, daemon)
    assert code == 2
    label, text = lines["connection"]
    assert label == "FAIL"
    assert f"loop at 127.0.0.1:{daemon.port} did not accept this computer's ADB key" in text
    assert "accept the 'Allow debugging?' prompt" in text
    assert _failed(lines) == ["connection"]
    assert all(lines[name][0] == "skip" for name in _PHONE_CHECKS)
    assert lines["screen"][1] == "not checked: needs connection"
    assert err.startswith("python -m profiler.doctor: error: loop is not ready for a LUT build: 1 check(s) failed "
                          "(connection).")


@pytest.mark.timeout(60)
def test_missing_benchmark_model_fails_its_line_with_where_to_get_one(capsys, tmp_path, daemon):
    missing = tmp_path / "nowhere" / "benchmark_model"
    code, lines, _ = _doctor(capsys, tmp_path, daemon, benchmark_model=str(missing))
    assert code == 2
    assert _failed(lines) == ["benchmark_model"]
    assert lines["benchmark_model"][1] == (
        f"no benchmark_model at {missing} (No such file or directory); expected TFLite's benchmark_model built for "
        "the phone, at the path `benchmark_model` names. Fix: download android_aarch64_benchmark_model "
        "(android_bench/README.md, section 1) and set `benchmark_model` of [loop] in "
        f"{tmp_path / 'devices.toml'} to its path"
    )
    for name in ("abi", "benchmark_model runs", "cpu delegate", "gpu delegate"):
        assert lines[name][0] == "skip"
    assert lines["battery"][0] == "ok"  # what needs no benchmark_model is still checked


@pytest.mark.timeout(60)
def test_benchmark_model_for_another_abi_fails_the_abi_line(capsys, tmp_path):
    arm64 = tmp_path / "android_aarch64_benchmark_model"
    arm64.write_bytes(_elf_header(0xB7))
    props = {"ro.product.cpu.abi": "armeabi-v7a", "ro.product.cpu.abilist": "armeabi-v7a,armeabi"}
    with LoopbackAdbDaemon(tmp_path / "phone", props=props) as daemon:
        code, lines, _ = _doctor(capsys, tmp_path, daemon, benchmark_model=str(arm64))
    assert code == 2
    assert _failed(lines) == ["abi"]
    assert lines["abi"][1] == (
        f"{arm64} is built for arm64-v8a, but loop runs armeabi-v7a, armeabi; set `benchmark_model` of [loop] in "
        f"{tmp_path / 'devices.toml'} to a build for armeabi-v7a (android_bench/README.md)."
    )
    assert lines["benchmark_model runs"] == ("skip", "not checked: needs abi")
    assert not (tmp_path / "phone" / "phonefit").exists()  # nothing pushed that cannot run


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("faults", "verdict"), [
    (Faults(gpu_unavailable=True), "delegation none ('WARN: GPU acceleration is unsupported on this platform.')"),
    (Faults(partial_gpu_models=("probe",)), "delegation partial ('INFO: Explicitly applied GPU delegate, and the "
                                            "model graph will be partially executed by the delegate w/ 1 delegate "
                                            "kernels.')"),
], ids=["unavailable", "partial"])
def test_gpu_delegate_not_applied_fails_the_gpu_line(capsys, tmp_path, faults, verdict):
    with LoopbackAdbDaemon(tmp_path / "phone", faults=faults) as daemon:
        code, lines, _ = _doctor(capsys, tmp_path, daemon)
    assert code == 2
    assert _failed(lines) == ["gpu delegate"]
    assert lines["gpu delegate"][1].startswith(f"the GPU delegate did not take the probe's graph: {verdict}; "
                                               "expected delegation full. Fix: check [loop.gpu] flags")
    assert lines["cpu delegate"][0] == "ok"


@pytest.mark.timeout(60)
def test_cpu_only_doctor_does_not_probe_the_gpu(capsys, tmp_path):
    with LoopbackAdbDaemon(tmp_path / "phone", faults=Faults(gpu_unavailable=True)) as daemon:
        code, lines, _ = _doctor(capsys, tmp_path, daemon, "--backend", "cpu")
    assert code == 0
    assert "gpu delegate" not in lines


@pytest.mark.timeout(60)
def test_hot_battery_fails_the_temperature_line(capsys, tmp_path):
    with LoopbackAdbDaemon(tmp_path / "phone", battery={"temperature": 452}) as daemon:
        code, lines, _ = _doctor(capsys, tmp_path, daemon, "--backend", "cpu")
    assert code == 2
    assert _failed(lines) == ["battery temperature"]
    assert lines["battery temperature"][1] == (
        "battery at 45.2 °C: hot, the phone throttles; expected below 40 °C. Fix: let the phone cool (screen off, "
        "off the charger's fast mode, out of the sun) and run the doctor again"
    )


@pytest.mark.timeout(60)
def test_warm_unplugged_phone_with_screen_on_is_ready_with_warnings(capsys, tmp_path):
    battery = {"temperature": 368, "USB powered": False, "status": 3, "level": 64}
    services = {"display": DEFAULT_SERVICES["display"].replace("mScreenState=OFF", "mScreenState=ON")}
    with LoopbackAdbDaemon(tmp_path / "phone", battery=battery, services=services) as daemon:
        code, lines, err = _doctor(capsys, tmp_path, daemon, "--backend", "cpu")
    assert code == 0, err
    warned = {name: text for name, (label, text) in lines.items() if label == "WARN"}
    assert set(warned) == {"cpu governor", "battery temperature", "battery", "screen"}
    assert warned["battery temperature"].startswith("battery at 36.8 °C: warm; expected below 35 °C")
    assert warned["battery"].startswith("64 %, not charging; expected charging. Fix: plug the phone in")
    assert warned["screen"].startswith("screen ON, asleep; expected the screen off")


@pytest.mark.timeout(60)
def test_throttling_and_battery_saver_fail_readiness(capsys, tmp_path):
    services = {
        "thermalservice": DEFAULT_SERVICES["thermalservice"].replace("Thermal Status: 0", "Thermal Status: 2"),
        "power": DEFAULT_SERVICES["power"].replace("mLowPowerMode=false", "mLowPowerMode=true"),
    }
    with LoopbackAdbDaemon(tmp_path / "phone", services=services) as daemon:
        code, lines, err = _doctor(capsys, tmp_path, daemon, "--backend", "cpu")
    assert code == 2
    assert _failed(lines) == ["thermal status", "battery"]
    assert lines["thermal status"][1].startswith("thermal status 2 (moderate); hottest zone cpu-1-0-usr at 38.5 °C: "
                                                 "the phone is throttling; expected thermal status 0 (none)")
    assert lines["battery"][1].startswith("87 %, charging (USB), battery saver on: it caps the CPU")
    assert "2 check(s) failed (thermal status, battery)" in err


@pytest.mark.timeout(60)
def test_json_output_names_every_check_and_readiness(capsys, tmp_path, daemon):
    code, _, _ = _doctor(capsys, tmp_path, daemon, "--json", benchmark_model=str(tmp_path / "missing"))
    assert code == 2
    devices = tmp_path / "devices.toml"
    assert main(["--device", "loop", "--devices", str(devices), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ready"] is False and report["device"] == "loop"
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses["connection"] == OK and statuses["benchmark_model"] == FAIL and statuses["cpu governor"] == WARN
    assert set(report["checks"][0]) == {"name", "status", "observed", "expected", "fix"}


# ---------------------------------------------------------------- bad input, help
def test_unknown_device_and_host_are_bad_input_in_one_line(capsys, tmp_path):
    devices = write_devices_toml(tmp_path / "devices.toml", {"pixel": {"address": "10.0.0.2:5555", "benchmark_model": "bm"}})
    assert main(["--device", "nope", "--devices", str(devices)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("python -m profiler.doctor: error: Unknown device 'nope'; expected a phone of devices.toml. "
                          "Known phones: pixel.")
    assert main(["--device", "host", "--devices", str(devices)]) == 2
    assert "The doctor checks phones; `host` is this computer" in capsys.readouterr().err


def test_help_explains_readiness(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: python -m profiler.doctor" in text and "--json" in text
    assert "Exit 0: ready (warnings allowed); 2: a check failed that makes a build impossible or its LUT wrong" in text


# ---------------------------------------------------------------- pure parts
def test_check_line_says_found_expected_and_fix():
    result = CheckResult("battery", WARN, "64 %, not charging", "charging", "plug the phone in")
    assert result.line() == "WARN  battery               64 %, not charging; expected charging. Fix: plug the phone in"
    assert CheckResult("battery", OK, "87 %", "charging", "x").line() == "ok    battery               87 %"


def test_sections_and_battery_parse_phone_text():
    text = "junk\nPHONEFIT_DOCTOR space\nFilesystem 1024-blocks Used Available Capacity Mounted on\nPHONEFIT_DOCTOR zones\n"
    assert parse_sections(text) == {"space": "Filesystem 1024-blocks Used Available Capacity Mounted on", "zones": ""}
    full = parse_battery("  AC powered: false\n  USB powered: false\n  status: 5\n  level: 50\n  scale: 50\n")
    assert (full.percent, full.charging, full.sources) == (100, True, ())
    unknown = parse_battery("Can't find service: battery\n")
    assert (unknown.percent, unknown.charging) == (None, False)


@pytest.mark.timeout(120)
def test_nnapi_delegate_not_applied_fails_the_nnapi_line(capsys, tmp_path):
    with LoopbackAdbDaemon(tmp_path / "phone", faults=Faults(partial_nnapi_models=("probe",))) as daemon:
        code, lines, _ = _doctor(capsys, tmp_path, daemon, "--backend", "nnapi")
    assert code == 2
    assert _failed(lines) == ["nnapi delegate"]
    assert "gpu delegate" not in lines and lines["cpu delegate"][0] == "ok"
    assert lines["nnapi delegate"][1].startswith(
        "the NNAPI delegate did not take the probe's graph: delegation partial ('INFO: Explicitly applied NNAPI delegate, "
        "and the model graph will be partially executed by the delegate w/ 1 delegate kernels.'); expected delegation "
        "full. Fix: check [loop.nnapi] flags has --use_nnapi=true, set its `accelerator`")
