"""The host device measures in a LiteRT-only process of its own, which a crash cannot take the
build down with, and which the conditions monitor does not count as another process."""
import os
import signal

import pytest

from lut.spec import LayerSpec
from lut.table import Measurement, MeasurementFailure
from profiler.host import HostDevice
from profiler.monitor import HostLoad
from profiler.single_op import SingleOpFactory
from profiler.timing import TimingPolicy

FAST = TimingPolicy(min_runs=5, min_seconds=0.0, max_seconds=0.05)
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def op_model():
    return SingleOpFactory().build(LayerSpec("conv2d", 8, 8, 16, 16, activation="relu6"))


def _libraries(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/" in line}


def test_models_are_measured_in_a_process_that_loads_litert_and_not_tensorflow(op_model):
    device = HostDevice(policy=FAST)
    try:
        [(_, result)] = device.measure([("op", op_model)])
        assert isinstance(result, Measurement) and result.median_us > 0
        pid = device._worker.pid
        assert pid != os.getpid()
        libraries = _libraries(pid)
    finally:
        device.close()
    assert "libLiteRt.so" in libraries
    assert not [name for name in libraries if "tensorflow" in name], "the measuring process loaded TensorFlow"


def test_a_measuring_process_killed_from_outside_is_replaced_and_the_model_measured(op_model):
    device = HostDevice(policy=FAST)
    try:
        list(device.measure([("first", op_model)]))
        killed = device._worker.pid
        os.kill(killed, signal.SIGKILL)
        results = dict(device.measure([("killed", op_model), ("garbage", b"not a model"), ("after", op_model)]))
        assert device._worker.pid != killed
    finally:
        device.close()
    assert isinstance(results["killed"], Measurement) and isinstance(results["after"], Measurement)
    assert isinstance(results["garbage"], MeasurementFailure) and "could not load" in results["garbage"].error


def test_close_ends_the_measuring_process(op_model):
    device = HostDevice(policy=FAST)
    list(device.measure([("op", op_model)]))
    process = device._worker._proc
    device.close()
    assert process.poll() is not None


def _fake_proc(root, *, busy: int, own: int, worker: int) -> None:
    for pid, ticks in (("self", own), ("42", worker)):
        (root / pid).mkdir(exist_ok=True)
        fields = ["S"] + ["0"] * 10 + [str(ticks), "0"] + ["0"] * 30
        (root / pid / "stat").write_text(f"{pid} (python) " + " ".join(fields))
    (root / "stat").write_text(f"cpu {busy} 0 0 1000 0 0 0 0 0 0\n")


def test_host_load_does_not_count_this_process_nor_the_measuring_process_it_names_as_others(tmp_path, monkeypatch):
    clock = iter([0.0, 1.0])
    monkeypatch.setattr("profiler.monitor.time.monotonic", lambda: next(clock))
    _fake_proc(tmp_path, busy=100, own=10, worker=20)
    load = HostLoad(str(tmp_path), own=lambda: [42])
    # a second later the machine used 60 ticks more: this process 10, its measuring process 40
    _fake_proc(tmp_path, busy=160, own=20, worker=60)
    assert load.others_cores() == pytest.approx(10 / os.sysconf("SC_CLK_TCK"))


def test_the_host_devices_load_probe_names_its_measuring_process(op_model):
    device = HostDevice(policy=FAST)
    try:
        list(device.measure([("op", op_model)]))
        assert list(device.load_probe()._own()) == [device._worker.pid]
    finally:
        device.close()
    assert list(device.load_probe()._own()) == []
