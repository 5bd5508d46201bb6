"""What a phone says of itself: its properties, CPU clusters, battery temperature and ABI.

The shell commands that ask, and pure parsers of their output (testable without a phone).
"""
from __future__ import annotations

import re

from profiler.errors import ProfilerError

__all__ = ["BATTERY_COMMAND", "FACTS_COMMAND", "battery_temp_c", "binary_abis", "check_abi", "parse_phone", "phone_abis"]

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
_BATTERY_MARK = "PHONEFIT_BATTERY"
# `dumpsys battery` is a costly process: only asked for where its answer is used.
BATTERY_COMMAND = f"echo {_BATTERY_MARK}; dumpsys battery 2>/dev/null"
_PROP_LIST = " ".join(f"{key}={prop}" for key, prop in _PROPS.items())
FACTS_COMMAND = (
    f"for kv in {_PROP_LIST}; do echo \"prop ${{kv%%=*}}=$(getprop ${{kv#*=}})\"; done; "
    "for d in /sys/devices/system/cpu/cpufreq/policy*; do [ -d \"$d\" ] || continue; "
    "echo \"cpufreq|${d##*/}|$(cat $d/related_cpus 2>/dev/null)|$(cat $d/scaling_governor 2>/dev/null)|"
    "$(cat $d/cpuinfo_max_freq 2>/dev/null)|$(cat $d/scaling_max_freq 2>/dev/null)\"; done; "
    f"{BATTERY_COMMAND}"
)


def battery_temp_c(output: str) -> float | None:
    """`dumpsys battery` prints `temperature: 312` in tenths of a degree Celsius."""
    after = output.split(_BATTERY_MARK, 1)
    match = re.search(r"^\s*temperature:\s*(-?\d+)\s*$", after[-1], re.MULTILINE) if len(after) == 2 else None
    return int(match.group(1)) / 10 if match else None


def parse_phone(output: str) -> dict[str, object]:
    """The output of `FACTS_COMMAND`: properties by key, `cpu_clusters`, `battery_temp_c`."""
    phone: dict[str, object] = {}
    clusters = []
    for line in output.split(_BATTERY_MARK, 1)[0].splitlines():
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
    phone["battery_temp_c"] = battery_temp_c(output)
    return phone


def binary_abis(binary: bytes) -> tuple[str, ...] | None:
    """The Android ABIs that run `binary` (an ELF executable), None for anything else (a
    script, an unknown processor): its ABI cannot be told."""
    if binary[:4] != b"\x7fELF" or len(binary) < 20:
        return None
    machine = int.from_bytes(binary[18:20], "little" if binary[5] == 1 else "big")
    return _ELF_MACHINES.get(machine)


def phone_abis(phone: dict[str, object]) -> list[str]:
    """The ABIs the phone runs (`parse_phone`'s `abilist`, else `abi`), best first; [] when it says none."""
    return [abi for abi in str(phone.get("abilist") or phone.get("abi") or "").split(",") if abi]


def check_abi(binary: bytes, phone: dict[str, object], *, name: str, path: object, source: str) -> None:
    """A benchmark_model built for another processor fails every model; say so at once.

    Args:
        binary: the benchmark_model file's bytes (an ELF executable; anything else is not checked).
        phone: what the phone said of itself (`parse_phone`), its `abilist` or `abi` used.
        name: the phone's name in devices.toml.
        path: where `binary` was read from.
        source: the devices.toml that names `path`.
    """
    runs_on = binary_abis(binary)
    abis = phone_abis(phone)
    if runs_on and abis and not set(runs_on) & set(abis):
        raise ProfilerError(
            f"{path} is built for {runs_on[0]}, but {name} runs {', '.join(abis)}; "
            f"set `benchmark_model` of [{name}] in {source} to a build for {abis[0]} "
            "(android_bench/README.md)."
        )
