"""NNAPI as a phone backend, end to end against the loopback phone (no phone needed).

The phone is tests/adb_daemon.py (the real ADB protocol on 127.0.0.1) with the benchmark_model
stand-in tests/fake_benchmark_model.py, which prints NNAPI's lines for `--use_nnapi=true`;
`Faults(partial_nnapi_models=…)` makes its NNAPI delegate take all but one node of a model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lut.table import LatencyTable, Measurement, MeasurementFailure
from profiler.build_lut import default_lut_path
from tests.adb_daemon import Faults, LoopbackAdbDaemon
from tests.conftest import LENIENT_FLAGS
from tests.test_adb_device import loop_entry, open_loop, tflite_models, write_devices_toml  # noqa: F401  (a fixture)

REPO = Path(__file__).parents[1]


@pytest.mark.timeout(600)
def test_nnapi_lut_build_records_the_accelerator_and_fails_partly_delegated_entries(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(4)(x)).save(tmp_path / "tiny.keras")
    # NNAPI takes every op of these models but the fully-connected one's (its file name says the op)
    with LoopbackAdbDaemon(tmp_path / "phone", faults=Faults(partial_nnapi_models=("fully_connected",))) as daemon:
        entry = loop_entry(tmp_path, daemon, nnapi={"accelerator": "google-edgetpu"})
        devices = write_devices_toml(tmp_path / "devices.toml", {"loop": entry})
        command = [sys.executable, "-m", "profiler.build_lut", "--device", "loop", "--devices", str(devices),
                   "--backend", "nnapi", "--model", str(tmp_path / "tiny.keras"), "--no-progress", *LENIENT_FLAGS]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "luts" / "loop-nnapi.sqlite"  # the default path of an NNAPI LUT
    assert default_lut_path("loop", "nnapi", 1) == "luts/loop-nnapi.sqlite"
    with LatencyTable.open(out) as table:
        meta, frame = table.meta, table.to_dataframe().set_index("key")
    assert (meta["device"], meta["backend"], meta["delegate"]) == ("loop", "nnapi", "nnapi/google-edgetpu")
    assert meta["flags"].endswith("--use_nnapi=true --warmup_min_secs=0 --nnapi_accelerator_name=google-edgetpu")
    assert json.loads(meta["fingerprint"])["benchmark_model_flags"] == meta["flags"]
    assert json.loads(meta["step"]) == 8  # the CPU's grid: no 4-channel slices as on the GPU
    failed = frame[frame["status"] == "failed"]
    assert list(failed.index.str.split(":").str[0]) == ["fully_connected"]
    error = failed["error"].iloc[0]
    assert error.startswith("the NNAPI delegate did not run the whole graph (delegation partial: 'INFO: Explicitly "
                            "applied NNAPI delegate, and the model graph will be partially executed by the delegate w/ "
                            "1 delegate kernels.'); not recorded as an NNAPI latency"), error
    ok = frame[frame["status"] == "ok"]
    assert sorted(ok.index.str.split(":").str[0]) == ["conv2d", "mean"]  # the model's other two entries, measured
    assert (ok["median_us"] > 0).all() and ok["error"].isna().all()


@pytest.mark.timeout(120)
def test_an_accelerator_the_phone_lacks_fails_every_entry_with_the_tools_line(tmp_path, tflite_models):  # noqa: F811
    with LoopbackAdbDaemon(tmp_path / "phone") as daemon:
        device = open_loop(tmp_path, daemon, backend="nnapi", nnapi={"accelerator": "qti-dsp"})
        try:
            assert device.conditions()["delegate"] == "nnapi/qti-dsp"
            [(_, result)] = list(device.measure([("conv", tflite_models["conv"])]))
        finally:
            device.close()
    assert isinstance(result, MeasurementFailure)
    assert result.error == ("the NNAPI delegate did not run the whole graph (delegation none: 'WARN: NNAPI acceleration "
                            "is unsupported on this platform.'); not recorded as an NNAPI latency")


@pytest.mark.timeout(120)
def test_nnapi_without_an_accelerator_lets_nnapi_choose(tmp_path, tflite_models):  # noqa: F811
    with LoopbackAdbDaemon(tmp_path / "phone", faults=Faults(partial_nnapi_models=("dw",))) as daemon:
        device = open_loop(tmp_path, daemon, backend="nnapi")
        try:
            conditions = device.conditions()
            results = dict(device.measure([("conv", tflite_models["conv"]), ("dw", tflite_models["dw"])]))
        finally:
            device.close()
    assert conditions["delegate"] == "nnapi/auto" and "--nnapi_accelerator_name" not in conditions["flags"]
    assert isinstance(results["conv"], Measurement)
    assert isinstance(results["dw"], MeasurementFailure)
    assert results["dw"].error.startswith("the NNAPI delegate did not run the whole graph (delegation partial: ")
