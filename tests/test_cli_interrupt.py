"""Ctrl-C during a phone batch keeps what the phone finished: it is committed, and the rerun
measures only the rest (the loopback ADB daemon plays the phone)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lut.table import LatencyTable
from profiler.build_lut import OVERHEAD_REPEATS
from profiler.context import _REPEATS, FETCH_BRANCHES
from profiler.monitor import _START_REPEATS
from tests.adb_daemon import LoopbackAdbDaemon
from tests.conftest import LENIENT_FLAGS
from tests.test_adb_device import loop_entry, write_devices_toml

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


def _small_model(path: Path) -> Path:
    """Two convolutions, a pooling and a dense layer: about a dozen LUT entries at step 8."""
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(4)(x)).save(path)
    return path


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_ctrl_c_during_a_phone_batch_commits_the_finished_entries_and_the_rerun_measures_the_rest(tmp_path):
    model = _small_model(tmp_path / "small.keras")
    out = tmp_path / "loop.sqlite"
    with LoopbackAdbDaemon(tmp_path / "phone") as daemon:
        devices = write_devices_toml(tmp_path / "devices.toml", {"loop": loop_entry(tmp_path, daemon, batch_size=64)})
        command = [sys.executable, "-m", "profiler.build_lut", "--device", "loop", "--devices", str(devices),
                   "--model", str(model), "--out", str(out), "--no-progress", *LENIENT_FLAGS]
        process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        finished_before_ctrl_c = _START_REPEATS + 3  # the quiet reference's looks, then 3 entries (the overhead comes after them)
        _wait_for(lambda: daemon.models_run >= finished_before_ctrl_c or process.poll() is not None, 200, "3 entries")
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 130, stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == (
            "python -m profiler.build_lut: interrupted; every entry measured so far is saved; run the same command to resume"
        )
        assert "Traceback" not in stderr
        with LatencyTable.open(out) as table:
            saved = table.to_dataframe()
        # Every model the phone had finished is in the LUT, as a measurement.
        assert len(saved) >= 2 and (saved["status"] == "ok").all() and (saved["median_us"] > 0).all()

        run_before = daemon.models_run
        rerun = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        with LatencyTable.open(out) as table:
            planned = len(table)
            assert set(saved["key"]) <= table.keys()
            checks = json.loads(table.meta["monitor"])["checks"]
            overhead_passes = json.loads(table.meta["invoke_overhead_parts"])["passes"]
        measured_again = daemon.models_run - run_before
    assert len(saved) < planned  # the interrupt came in the middle of the batch
    # only what was missing, nothing twice in one pass; then every entry in the second pass (the
    # interrupt came in the first); besides: the monitor's reference once a chunk and at the end,
    # the invocation overhead (alone, chained: after each pass's entries, so not before the
    # interrupt), and the cache context's sweep
    # (each model with its reference, after one look: its monitor opens with the LUT's quiet value)
    assert overhead_passes >= 2
    assert measured_again == (planned - len(saved) + planned + checks + 1 + 2 * OVERHEAD_REPEATS * overhead_passes
                              + 2 * _REPEATS * len(FETCH_BRANCHES))
    assert f"{planned - len(saved)} measured, {len(saved)} reused" in rerun.stdout


@pytest.mark.timeout(300)
def test_ctrl_c_to_a_host_builds_process_group_saves_what_was_measured_and_fails_no_entry(tmp_path):
    """Ctrl-C in a terminal reaches the host's measuring process too: it must not die first and
    have the model it was timing recorded as one that crashed LiteRT."""
    import sqlite3

    model = _small_model(tmp_path / "small.keras")
    out = tmp_path / "host.sqlite"
    command = [sys.executable, "-m", "profiler.build_lut", "--device", "host", "--model", str(model),
               "--step", "1", "--out", str(out), "--no-progress", *LENIENT_FLAGS]
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group, as a terminal's foreground job

    def entries() -> int:
        try:
            with sqlite3.connect(f"file:{out}?mode=ro", uri=True) as db:
                return int(db.execute("select count(*) from entries").fetchone()[0])
        except sqlite3.Error:
            return 0

    _wait_for(lambda: entries() >= 20 or process.poll() is not None, 200, "20 entries")
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.strip().splitlines()[-1].endswith("interrupted; every entry measured so far is saved; run the same command to resume")
    with LatencyTable.open(out) as table:
        saved = table.to_dataframe()
    assert len(saved) >= 20 and (saved["status"] == "ok").all(), saved[saved["status"] != "ok"]
