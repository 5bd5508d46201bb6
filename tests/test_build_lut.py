import dataclasses
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

import keras
import pytest

from lut.spec import LutError
from lut.table import LatencyTable
from profiler.plan import plan_specs
from tests.conftest import LENIENT, LENIENT_FLAGS

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
TINY = ["--model", "mobilenet_v1", "--alpha", "0.25", "--resolution", "32", "--classes", "10"]


def _build_lut(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "profiler.build_lut", "--no-progress", *LENIENT_FLAGS, *args],
        capture_output=True, text=True, env=ENV, **kwargs,
    )


def _rows(path) -> dict[str, tuple]:
    with sqlite3.connect(path) as db:
        return {row[0]: row[1:] for row in db.execute("SELECT key, status, median_us, measured_at FROM entries")}


def test_build_lut_measures_every_planned_entry_with_its_conditions(tmp_path, tiny_v1):
    out = tmp_path / "host.sqlite"
    run = _build_lut("--device", "host", *TINY, "--step", "64", "--out", str(out), "--csv", str(tmp_path / "lut.csv"))
    assert run.returncode == 0, run.stderr
    planned = {s.key for s in plan_specs([tiny_v1], 64)}
    with LatencyTable.open(out) as table:
        assert table.keys() == planned
        frame = table.to_dataframe()
        assert (frame.status == "ok").all() and (frame.median_us > 0).all() and (frame["count"] >= 15).all()
        assert (frame.min_us <= frame.median_us).all() and (frame.median_us <= frame.max_us).all()
        meta = table.meta
        assert (meta["device"], meta["backend"], meta["threads"], meta["delegate"], meta["step"]) == ("host", "cpu", "1", "xnnpack", "64")
        assert {"cpu_model", "os", "runtime", "tensorflow"} <= table.fingerprint.keys()
        # an invocation's cost beyond its ops, in both passes: under the typical entry, which holds one and an op
        assert 0 < float(meta["invoke_overhead_us"]) < statistics.median(table.latencies_us().values())
        assert json.loads(meta["invoke_overhead_parts"])["passes"] >= 2
    assert f"{len(planned)} entries planned: {len(planned)} measured, 0 reused" in run.stdout
    assert (tmp_path / "lut.csv").read_text().count("\n") == len(planned) + 1


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_without_duplicate_or_lost_rows(tmp_path, tiny_v1):
    out = tmp_path / "host.sqlite"
    planned = {s.key for s in plan_specs([tiny_v1], 32)}
    args = [sys.executable, "-m", "profiler.build_lut", "--no-progress", *LENIENT_FLAGS,
            "--device", "host", *TINY, "--step", "32", "--out", str(out)]
    victim = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not out.exists() or len(_rows(out)) < 40):
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = _rows(out)
    assert 40 <= len(before) < len(planned), "the kill must land in the middle of the run"

    rerun = _build_lut("--device", "host", *TINY, "--step", "32", "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    after = _rows(out)
    assert set(after) == planned  # nothing lost, nothing extra
    # rows measured before the kill kept as they were, or replaced by their second pass (when it came out lower)
    assert all(after[k] == before[k] or after[k][2] > before[k][2] for k in before)
    with sqlite3.connect(out) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM entries").fetchone() == (len(planned), len(planned))
        assert {passes for (passes,) in db.execute("SELECT passes FROM entries")} == {2}  # every entry in both passes
    assert f"{len(planned) - len(before)} measured, {len(before)} reused" in rerun.stdout


def test_unknown_device_fails_with_the_list_of_known_devices(tmp_path):
    run = _build_lut("--device", "pixel9", *TINY, "--out", str(tmp_path / "x.sqlite"), cwd=tmp_path)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m profiler.build_lut: error: Unknown device 'pixel9'. Known devices: host")
    assert "Traceback" not in run.stderr and not (tmp_path / "x.sqlite").exists()


def test_corrupt_lut_file_fails_clearly_and_is_left_alone(tmp_path):
    out = tmp_path / "corrupt.sqlite"
    out.write_bytes(b"\x00garbage" * 1000)
    run = _build_lut("--device", "host", *TINY, "--step", "64", "--out", str(out))
    assert run.returncode == 2 and "is not a phonefit LUT" in run.stderr and "Traceback" not in run.stderr
    assert out.read_bytes() == b"\x00garbage" * 1000


def test_unsupported_layer_fails_naming_the_layer(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3)(inputs)
    x = keras.layers.LayerNormalization(name="odd_norm")(x)
    path = tmp_path / "odd.keras"
    keras.Model(inputs, x).save(path)
    run = _build_lut("--device", "host", "--model", str(path), "--out", str(tmp_path / "x.sqlite"))
    assert run.returncode == 2
    assert "Layer 'odd_norm' of class LayerNormalization is not supported" in run.stderr


class _ClockedInterpreter:
    """An interpreter whose invocation takes 1 µs on a clock that costs 0.7 µs to read."""

    def __init__(self):
        self.now_ns = 0

    def invoke(self):
        self.now_ns += 1000

    def clock(self):
        self.now_ns += 700
        return self.now_ns


def test_a_sample_amortizes_the_cost_of_reading_the_clock():
    from profiler.timing import TimingPolicy, time_interpreter

    policy = TimingPolicy(min_runs=5, min_seconds=0.0)
    one_per_read = _ClockedInterpreter()
    assert time_interpreter(one_per_read, dataclasses.replace(policy, sample_us=0), one_per_read.clock).median_us == 1.7
    amortized = _ClockedInterpreter()  # warm-up: 3 invocations in 3.7 µs, so 40 of them (50 µs) a sample
    assert time_interpreter(amortized, policy, amortized.clock).median_us == pytest.approx(1 + 0.7 / 40)


def test_extending_a_lut_keeps_the_invocation_overhead_its_entries_were_measured_with(tmp_path):
    from lut.spec import LayerSpec
    from profiler.build_lut import build_lut
    from profiler.host import HostDevice
    from profiler.timing import TimingPolicy

    device = HostDevice(policy=TimingPolicy(min_runs=5, min_seconds=0.0, max_seconds=0.05))
    spec = LayerSpec.from_key("conv2d:f32:8x8x8:8:k1x1:s1x1:same:relu6")
    with LatencyTable.create(tmp_path / "lut.sqlite", device.conditions()) as table:
        build_lut(device, [spec], table, progress=False, policy=LENIENT)
        first = table.meta["invoke_overhead_us"]
        assert float(first) > 0
        build_lut(device, [spec.replace(cout=16)], table, progress=False, policy=LENIENT)
        assert table.meta["invoke_overhead_us"] == first and len(table.keys()) == 2


def test_an_int8_lut_measures_the_int8_models_ops_and_keeps_its_dtype_as_a_condition(tmp_path, tiny_v1):
    import numpy as np

    from lut.latency import estimate_latency_ms
    from profiler.convert import keras_to_tflite

    out = tmp_path / "host-int8.sqlite"
    run = _build_lut("--device", "host", *TINY, "--step", "64", "--dtype", "int8", "--out", str(out))
    assert run.returncode == 0, run.stderr
    planned = plan_specs([tiny_v1], 64, "int8")
    assert {s.dtype for s in planned} == {"int8"} and {"quantize", "dequantize"} <= {s.op for s in planned}
    with LatencyTable.open(out) as table:
        assert table.keys() == {s.key for s in planned} and table.dtype == "int8" and table.meta["dtype"] == "int8"
        assert (table.to_dataframe().status == "ok").all()
        # A Keras model is estimated as converted to int8; so is its int8 .tflite, op for op.
        calibration = [np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)]
        int8 = keras_to_tflite(tiny_v1, representative_data=calibration)
        assert estimate_latency_ms(tiny_v1, table) == pytest.approx(estimate_latency_ms(int8, table))
        with pytest.raises(LutError, match=r"holds int8 ops; conv2d:f32:.* is float32.*--dtype float32"):
            estimate_latency_ms(keras_to_tflite(tiny_v1), table)

    again = _build_lut("--device", "host", *TINY, "--step", "64", "--out", str(out))  # float32, into the int8 LUT
    assert again.returncode == 2
    assert "was measured with dtype='int8', not 'float32'" in again.stderr


def test_a_lut_of_before_the_dtype_condition_is_float32(tmp_path):
    path = tmp_path / "old.sqlite"
    with LatencyTable.create(path, {"device": "host", "backend": "cpu"}) as table:
        assert "dtype" not in table.meta and table.dtype == "float32"
    with LatencyTable.create(path, {"device": "host", "backend": "cpu", "dtype": "float32"}) as table:
        assert table.dtype == "float32"
