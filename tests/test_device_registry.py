"""The device registry imports no backend; backends are found by kind when a device opens."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from profiler import devices
from profiler.adb import wire
from profiler.adb.archive import batch_archive
from profiler.devices import DEVICE_KINDS, open_device, register_device_kind
from profiler.errors import ProfilerError
from profiler.timing import TimingPolicy

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_registry_imports_no_backend():
    code = ("import sys, profiler, profiler.devices; "
            "print(sorted(m for m in sys.modules if m in ('profiler.host', 'profiler.adb', 'adb_shell')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.strip() == "[]"


def test_the_host_takes_the_callers_timing_policy():
    policy = TimingPolicy(min_runs=40, max_seconds=2.0)
    device = open_device("host", timing=policy)
    assert device.policy is policy and device.conditions()["device"] == "host"
    assert open_device("host").policy == TimingPolicy()


def test_a_registered_kind_wins_and_unknown_kinds_are_listed(monkeypatch):
    opened = []

    @register_device_kind("host")
    def fake(name, config, backend, threads, *, timing=None):
        opened.append((name, backend, threads, timing))
        return "a device"

    try:
        assert open_device("host", threads=2) == "a device"
        assert opened == [("host", "cpu", 2, None)]
    finally:
        del DEVICE_KINDS["host"]
    with pytest.raises(ProfilerError, match=r"Unknown device kind 'tpu'. Known kinds: adb, host. Received: kind='tpu'"):
        devices._factory("tpu")


def test_an_unsupported_adb_shell_is_refused_naming_the_supported_versions(monkeypatch):
    wire.check_adb_shell()  # the installed one is supported
    monkeypatch.setattr(wire.metadata, "version", lambda name: "0.5.1")
    with pytest.raises(ProfilerError, match=r"supports adb-shell >= 0.4.4, < 0.5. Received: adb-shell 0.5.1"):
        wire.check_adb_shell()
    monkeypatch.setattr(wire.metadata, "version", lambda name: "0.4.4")
    monkeypatch.delattr(wire.AdbShellDevice, "_read_until")
    with pytest.raises(ProfilerError, match=r"Received: adb-shell 0.4.4 without _read_until"):
        wire.check_adb_shell()


def test_a_batch_archive_is_the_same_bytes_for_the_same_models():
    entries = [("a", b"x" * 700, "m000_a.tflite"), ("b", b"", "m001_b.tflite")]
    assert batch_archive(entries) == batch_archive(list(entries))
