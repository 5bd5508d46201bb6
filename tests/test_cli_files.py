"""Files a new user gets wrong: outputs under a file or in read-only places are refused before
the work starts; odd models, damaged model files and tampered or read-only LUTs get one line
that says what they are (exit 2), and a plain Sequential model just works."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import pytest

from lut.errors import LutError
from lut.table import LatencyTable
from tests.conftest import LENIENT_FLAGS

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
TINY = ["--model", "mobilenet_v1", "--alpha", "0.25", "--resolution", "32", "--classes", "10"]
# Root writes anywhere: a read-only place is checked as the unprivileged user `nobody`.
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
needs_unprivileged = pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv cannot be refused a write"
)


_MEASURING = ("profiler.build_lut", "adapter.validate_lut", "adapter.adapt", "adapter.baseline")


def _cli(*argv, cwd=REPO, timeout=300, unprivileged=False) -> subprocess.CompletedProcess:
    if len(argv) > 1 and argv[0] == "-m" and argv[1] in _MEASURING and "--help" not in argv:
        argv = (*argv, *LENIENT_FLAGS)  # the machine running the tests may be busy
    prefix = AS_NOBODY if unprivileged else []
    env = {**ENV, "HOME": str(cwd)} if unprivileged else ENV
    return subprocess.run([*prefix, sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _error_line(run: subprocess.CompletedProcess, module: str) -> str:
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    ours = [line for line in run.stderr.splitlines() if line.startswith(f"python -m {module}: ")]
    assert len(ours) == 1, run.stderr[-3000:]
    return ours[0]


@pytest.fixture
def shared_dir():
    """A folder `nobody` can use (pytest's tmp_path is private to its user)."""
    path = Path(tempfile.mkdtemp(prefix="phonefit-cli-"))
    path.chmod(0o777)
    yield path
    for sub in path.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o777)
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_v1):
    from tests.test_netadapt import write_synthetic_lut

    folder = tmp_path_factory.mktemp("files")
    tiny_v1.save(folder / "tiny.keras")
    return {"model": folder / "tiny.keras", "lut": write_synthetic_lut(folder / "tiny.sqlite", [tiny_v1], device="host")}


# ---------------------------------------------------------------- outputs checked before the work


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "module, argv",
    [
        ("profiler.build_lut", ["--device", "host", *TINY, "--out", "{F}/l.sqlite"]),
        ("profiler.build_lut", ["--device", "host", *TINY, "--out", "l.sqlite", "--csv", "{F}/l.csv"]),
        ("adapter.train", ["--epochs", "1", "--out", "{F}/m.keras"]),
        ("adapter.validate_lut", ["--lut", "{lut}", *TINY, "--samples", "2", "--json", "{F}/v.json"]),
        ("adapter.adapt", ["--model", "{model}", "--lut", "{lut}", "--budget", "0.6", "--out", "{F}/run"]),
        ("adapter.baseline", ["--model", "{model}", "--lut", "{lut}", "--budget", "0.6", "--out", "{F}/run"]),
        ("adapter.demo", ["--out", "{F}/demo"]),
    ],
)
def test_an_output_under_an_existing_file_is_refused_before_any_work(tmp_path, tiny_files, module, argv):
    afile = tmp_path / "afile"
    afile.write_text("in the way\n")
    names = {"F": afile, "lut": tiny_files["lut"], "model": tiny_files["model"]}
    run = _cli("-m", module, *[part.format(**names) for part in argv], cwd=tmp_path)
    line = _error_line(run, module)
    assert f"cannot be created: {afile} is a file, not a folder." in line
    assert run.stdout == ""  # nothing trained, loaded, measured or written first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.timeout(120)
@needs_unprivileged
def test_a_read_only_folder_is_refused_before_any_work(shared_dir, tiny_files):
    locked = shared_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    run = _cli("-m", "adapter.train", "--epochs", "1", "--out", str(locked / "m.keras"), cwd=shared_dir, unprivileged=True)
    line = _error_line(run, "adapter.train")
    assert line == (
        f"python -m adapter.train: error: --out {locked / 'm.keras'} cannot be written: the folder {locked} is not "
        "writable by this user. Choose a writable place, or make it writable (chmod u+w)."
    )
    assert run.stdout == ""


@pytest.mark.timeout(300)
def test_csv_into_a_new_folder_is_created_like_out(tmp_path):
    run = _cli("-m", "profiler.build_lut", "--device", "host", *TINY, "--step", "64", "--no-progress",
               "--out", str(tmp_path / "luts" / "l.sqlite"), "--csv", str(tmp_path / "csv" / "deeper" / "l.csv"))
    assert run.returncode == 0, run.stderr[-3000:]
    with LatencyTable.open(tmp_path / "luts" / "l.sqlite") as table:
        entries = len(table)
    lines = (tmp_path / "csv" / "deeper" / "l.csv").read_text().splitlines()
    assert lines[0].startswith("key,op,") and len(lines) == entries + 1
    assert "XNNPACK delegate" not in run.stderr  # LiteRT's once-per-process notice stays off the terminal


# ---------------------------------------------------------------- models


@pytest.mark.timeout(300)
def test_a_plain_sequential_model_is_profiled_and_estimated(tmp_path):
    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4, activation="softmax"),
    ])
    model.save(tmp_path / "seq.keras")
    lut = tmp_path / "seq.sqlite"
    built = _cli("-m", "profiler.build_lut", "--device", "host", "--model", str(tmp_path / "seq.keras"), "--step", "64",
                 "--out", str(lut), "--no-progress")
    assert built.returncode == 0, built.stderr[-3000:]
    assert "4 entries planned: 4 measured, 0 reused, 0 failed" in built.stdout
    estimated = _cli("-m", "lut.estimate", "--lut", str(lut), str(tmp_path / "seq.keras"))
    assert estimated.returncode == 0, estimated.stderr[-3000:]
    assert estimated.stdout.split()[1:] == ["ms", str(tmp_path / "seq.keras"), "on", "host", "(4", "ops)"]
    assert float(estimated.stdout.split()[0]) > 0


def _odd_models(folder: Path) -> dict[str, str]:
    """Model files that are not what build_lut can read, and how each must be described."""
    keras.Sequential([keras.layers.Conv2D(8, 3), keras.layers.GlobalAveragePooling2D()]).save(folder / "unbuilt.keras")
    inputs = keras.Input((None, None, 3))
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(inputs))).save(folder / "anysize.keras")
    (folder / "text.keras").write_text("not a model, just text\n")
    whole = (folder / "anysize.keras").read_bytes()
    (folder / "truncated.keras").write_bytes(whole[: len(whole) // 2])
    return {
        "unbuilt.keras": "is a keras.Sequential without an input shape; expected a model that knows its input",
        "anysize.keras": "takes inputs of shape (None, None, None, 3); expected images of a fixed size",
        "text.keras": "is not a zip archive (23 bytes starting b'not '); expected a .keras model",
        "truncated.keras": "is a damaged or truncated zip archive",
    }


@pytest.mark.timeout(300)
def test_odd_and_damaged_model_files_are_one_line_exit_2_saying_what_they_are(tmp_path, tiny_files):
    for name, description in _odd_models(tmp_path).items():
        for module, argv in (("profiler.build_lut", ["--model", str(tmp_path / name), "--out", str(tmp_path / "l.sqlite")]),
                             ("lut.estimate", ["--lut", str(tiny_files["lut"]), str(tmp_path / name)])):
            line = _error_line(_cli("-m", module, *argv, cwd=tmp_path), module)
            assert f"{tmp_path / name} {description}" in line, line
            assert "File not found" not in line
    assert not (tmp_path / "l.sqlite").exists()


@pytest.mark.timeout(120)
def test_a_file_that_is_not_an_npz_is_one_line_exit_2(tmp_path):
    (tmp_path / "bad.npz").write_text("not an npz\n")
    run = _cli("-m", "adapter.train", "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "m.keras"))
    line = _error_line(run, "adapter.train")
    assert line.startswith(f"python -m adapter.train: error: {tmp_path / 'bad.npz'} is not a zip archive (b'not an'…); expected")
    assert "expected an .npz, the zip of arrays np.savez writes" in line


# ---------------------------------------------------------------- LUTs


def _tampered(source: Path, folder: Path, value) -> Path:
    path = folder / f"tampered-{value}.sqlite"
    shutil.copy(source, path)
    with sqlite3.connect(path) as db:
        key = db.execute("SELECT key FROM entries WHERE op = 'conv2d' ORDER BY key LIMIT 1").fetchone()[0]
        db.execute("UPDATE entries SET median_us = ? WHERE key = ?", (value, key))
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value, shown", [(-0.189, "-0.189 us"), (0.0, "0.0 us"), (float("nan"), "missing or NaN")])
def test_a_lut_with_non_positive_or_nan_latencies_is_refused_on_open(tmp_path, tiny_files, value, shown):
    path = _tampered(tiny_files["lut"], tmp_path, value)
    with pytest.raises(LutError, match=r"holds 1 entries whose latency is not a positive finite number \(e\.g\. conv2d"):
        LatencyTable.open(path)
    run = _cli("-m", "lut.estimate", "--lut", str(path), str(tiny_files["model"]))
    line = _error_line(run, "lut.estimate")
    assert f": {shown}); expected microseconds > 0 as build_lut measures them." in line
    assert run.stdout == ""  # no estimate was printed


@needs_unprivileged
@pytest.mark.timeout(300)
def test_a_read_only_lut_is_read_and_a_write_to_it_is_one_clear_line(shared_dir):
    lut = shared_dir / "luts" / "l.sqlite"
    built = _cli("-m", "profiler.build_lut", "--device", "host", *TINY, "--step", "64", "--out", str(lut), "--no-progress")
    assert built.returncode == 0, built.stderr[-3000:]
    model = shared_dir / "tiny.keras"
    from lut.models import build_model

    build_model("mobilenet_v1", alpha=0.25, resolution=32, classes=10).save(model)
    lut.parent.chmod(0o555)  # a folder nobody may write: SQLite cannot keep a journal there
    estimated = _cli("-m", "lut.estimate", "--lut", str(lut), str(model), cwd=shared_dir, unprivileged=True)
    assert estimated.returncode == 0 and " ms " in estimated.stdout, estimated.stderr[-3000:]
    # Nothing is left to measure, and the LUT still cannot be written: said before anything loads.
    again = _cli("-m", "profiler.build_lut", "--device", "host", *TINY, "--step", "64", "--out", str(lut),
                 "--no-progress", cwd=shared_dir, unprivileged=True)
    line = _error_line(again, "profiler.build_lut")
    assert line.startswith(f"python -m profiler.build_lut: error: --out {lut} ")
    # as root's file seen by nobody, the file itself is read-only; as the owner, its folder is
    assert "is read-only for this user" in line or f"the folder {lut.parent} is not writable" in line, line
    assert "not a phonefit LUT" not in line
    lut.parent.chmod(0o755)
    lut.chmod(0o444)
    write = subprocess.run([*AS_NOBODY, sys.executable, "-c", "from lut.table import LatencyTable; "
                            f"LatencyTable.open({str(lut)!r}).set_meta({{'x': 1}})"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert write.returncode == 1
    assert write.stderr.strip().splitlines()[-1].startswith(
        f"lut.errors.LutError: Cannot write to the LUT {lut}: it is read-only for this user"
    )


@pytest.mark.timeout(120)
def test_a_devices_file_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    devices = tmp_path / "devices.toml"
    devices.write_bytes(b'[phone]\naddress = "caf\xe9:5555"\n')
    run = _cli("-m", "profiler.build_lut", "--device", "phone", "--devices", str(devices), "--model", "mobilenet_v1",
               "--alpha", "0.25", "--resolution", "32", "--classes", "10", "--out", str(tmp_path / "l.sqlite"))
    assert _error_line(run, "profiler.build_lut") == (
        f"python -m profiler.build_lut: error: {devices} is not UTF-8 text (byte b'\\xe9' at position 22); "
        "expected a devices.toml in UTF-8 (see devices.example.toml). Save it as UTF-8."
    )


@pytest.mark.timeout(120)
def test_a_tflite_file_that_is_not_one_is_one_line_exit_2(tmp_path, tiny_files):
    (tmp_path / "model.tflite").write_text("just some text\n")
    run = _cli("-m", "lut.estimate", "--lut", str(tiny_files["lut"]), str(tmp_path / "model.tflite"))
    assert _error_line(run, "lut.estimate") == (
        f"python -m lut.estimate: error: {tmp_path / 'model.tflite'} is not a TFLite model (it starts b'just som'); "
        "expected a .tflite flatbuffer as the TFLite converter writes it (identifier TFL3). Convert the model again, "
        "or pass its .keras file."
    )
