"""The adapt and baseline CLIs: bad input exits 2 with one line; a full run writes everything."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from adapter.adapt import run_cli
from adapter.baseline import main as baseline_main
from tests.conftest import LENIENT_FLAGS
from tests.test_netadapt import REPO, small_npz, write_synthetic_lut


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny MobileNetV1 (.keras), its synthetic LUT, and a small Fashion-MNIST .npz."""
    from adapter.training.sources import load_dataset
    from lut.models import build_model

    folder = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(3)
    model = build_model("mobilenet_v1", alpha=0.25, resolution=32, classes=10)
    model.save(folder / "tiny.keras")
    lut = write_synthetic_lut(folder / "synthetic.sqlite", [model])
    if not Path(os.environ.get("PHONEFIT_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    data = load_dataset("fashion_mnist", resolution=32, holdout=200)
    data = dataclasses.replace(data, train=data.train.take(440), test=data.test.take(100))
    return {"model": folder / "tiny.keras", "lut": lut, "data": small_npz(data, folder / "small.npz"), "dir": folder}


def _argv(files, tmp_path, **changes):
    options = {"--model": files["model"], "--lut": files["lut"], "--budget": "0.6", "--data": files["data"],
               "--out": tmp_path / "out", "--holdout": "100", "--short-term-steps": "2", "--batch-size": "32",
               "--initial-reduction": "0.1", "--decay": "1.0", "--long-term-epochs": "0", **changes}
    return [str(part) for key, value in options.items() if value is not None for part in (key, value)] + list(LENIENT_FLAGS)


def _one_line_error(capsys, argv, match: str, *, baseline_only: bool = False) -> str:
    assert (baseline_main if baseline_only else run_cli)(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(("python -m adapter.adapt: error:", "python -m adapter.baseline: error:"))
    assert "Traceback" not in "\n".join(err)
    assert match in err[-1], err[-1]
    return err[-1]


def test_missing_files_exit_2(files, tmp_path, capsys):
    _one_line_error(capsys, _argv(files, tmp_path, **{"--model": tmp_path / "none.keras"}), "none.keras does not exist")
    _one_line_error(capsys, _argv(files, tmp_path, **{"--lut": tmp_path / "none.sqlite"}), "none.sqlite does not exist")
    baseline_argv = ["--model", str(tmp_path / "none.keras"), "--lut", str(files["lut"]), "--budget", "0.5",
                     "--out", str(tmp_path / "out")]
    _one_line_error(capsys, baseline_argv, "none.keras does not exist", baseline_only=True)


def test_malformed_lut_exits_2(files, tmp_path, capsys):
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database, just text\n" * 100)
    _one_line_error(capsys, _argv(files, tmp_path, **{"--lut": bad}), "is not a phonefit LUT")


def test_a_lut_far_from_what_the_device_measures_exits_2_before_any_training(files, tmp_path, capsys):
    model = keras.models.load_model(files["model"])
    # a thousand times what this machine can take for these ops: no load or drift explains that
    lut = write_synthetic_lut(tmp_path / "far.sqlite", [model], device="host", scale=1000.0)
    line = _one_line_error(capsys, _argv(files, tmp_path, **{"--lut": lut}), "The LUT estimates the original at")
    assert "tolerance ±15%, --lut-tolerance" in line and "Rebuild the LUT on this device" in line
    assert not (tmp_path / "out" / "adapted.keras").exists()


def test_bad_budget_exits_2(files, tmp_path, capsys):
    _one_line_error(capsys, _argv(files, tmp_path, **{"--budget": "half"}), "budget is a fraction")
    _one_line_error(capsys, _argv(files, tmp_path, **{"--budget": "1.5"}), "in (0, 1)")


def test_budget_that_cannot_be_met_exits_2_before_any_training(files, tmp_path, capsys):
    _one_line_error(capsys, _argv(files, tmp_path, **{"--budget": "0.05"}), "cannot be met")
    assert not (tmp_path / "out" / "history.csv").exists()


def test_what_the_lut_lacks_of_the_original_is_measured_on_its_device_first(files, tmp_path, capsys):
    from lut.table import LatencyTable
    from profiler.plan import plan_specs

    model = keras.models.load_model(files["model"])
    stem = {s.key for s in plan_specs([model], 8) if s.op == "conv2d" and s.cin == 3}  # every width of the stem (RGB in)
    lut = write_synthetic_lut(tmp_path / "gap.sqlite", [model], device="host", drop=stem)
    argv = _argv(files, tmp_path, **{"--lut": lut, "--budget": "0.05"}) + ["--lut-tolerance", "100000"]
    assert run_cli(argv) == 2  # the budget cannot be met: said after the original was estimated, before training
    out, err = capsys.readouterr()
    assert "cannot be met" in err.strip().splitlines()[-1]
    assert "layer(s) missing from" in out and "on host" in out
    with LatencyTable.open(lut) as table:
        measured = {spec.key for spec in table.latencies_us()}
    assert stem & measured and not (tmp_path / "out" / "history.csv").exists()


def test_unknown_device_exits_2(files, tmp_path, capsys):
    _one_line_error(capsys, _argv(files, tmp_path, **{"--device": "nosuchphone"}), "Unknown device 'nosuchphone'")


def test_device_other_than_the_luts_exits_2(files, tmp_path, capsys):
    _one_line_error(capsys, _argv(files, tmp_path, **{"--device": "host"}), "was measured under")


def test_unreachable_phone_exits_2(files, tmp_path, capsys):
    devices = tmp_path / "devices.toml"
    devices.write_text(
        "[phone]\ntransport = \"tcp\"\naddress = \"127.0.0.1:9\"\n"
        f"benchmark_model = \"{REPO / 'tests' / 'fake_benchmark_model.py'}\"\n"
        f"adb_key = \"{tmp_path / 'adbkey'}\"\nconnect_timeout_s = 1.0\nreconnect_tries = 0\n"
    )
    _one_line_error(capsys, _argv(files, tmp_path, **{"--device": "phone", "--devices": devices}), "phone")


def test_errors_print_one_line_without_traceback_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "adapter.adapt", "--model", str(tmp_path / "none.keras"), "--lut", "x.sqlite",
         "--budget", "0.5", "--out", str(tmp_path / "out")],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    ours = [line for line in result.stderr.splitlines() if "adapter" in line or "Traceback" in line]
    assert ours == [f"python -m adapter.adapt: error: --model {tmp_path / 'none.keras'} does not exist."]


@pytest.mark.slow
def test_adapt_writes_models_history_report_and_baseline_measured_on_the_host(files, tmp_path):
    lut = write_synthetic_lut(tmp_path / "host.sqlite", [keras.models.load_model(files["model"])], device="host")
    # a synthetic LUT does not predict this machine: the guard on the original is opened wide
    argv = _argv(files, tmp_path, **{"--lut": lut}) + ["--int8", "--baseline", "--baseline-epochs", "1",
                                                       "--lut-tolerance", "100000"]
    result = subprocess.run([sys.executable, "-m", "adapter.adapt", *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=840, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1: ran, but over the budget when measured
    out = tmp_path / "out"
    for name in ("adapted.keras", "adapted.tflite", "adapted_int8.tflite", "history.csv", "proposals.csv",
                 "report.json", "report.md", "accuracy_latency.png", "baseline/baseline.tflite"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    budget, adapted, baseline = report["budget"], report["adapted"], report["baseline"]
    assert budget["met_by_estimate"] and adapted["estimated_ms"] <= budget["estimated_ms"]
    assert budget["requested_fraction"] == 0.6 and budget["relative"]
    original_estimate = report["original"]["estimated_ms"]
    recalibrations = budget["recalibrations"]  # a searched model measured over the budget scales it
    assert budget["estimated_ms"] == pytest.approx(recalibrations[-1]["budget_ms"] if recalibrations
                                                   else 0.6 * original_estimate, rel=1e-6)
    assert all(r["measured_fraction"] > 0.6 * 1.03 for r in recalibrations)
    assert adapted["measured_ms"] > 0 and adapted["int8"]["measured_ms"] > 0
    fraction = budget["measured_fraction"]  # interleaved: the median of the rounds' ratios
    # 5 rounds, and 5 more while their ratios spread enough to move the median (up to 15)
    assert budget["conditions"]["rounds"] in (5, 10, 15) and budget["conditions"]["after"]["reference_us"] > 0
    assert len(budget["conditions"]["rounds_us"]["adapted"]) == budget["conditions"]["rounds"]
    expected = "over budget" if fraction > 0.6 * 1.03 else "over-pruned" if fraction < 0.6 * 0.9 else "met"
    assert budget["status"] == expected
    assert result.returncode == (1 if expected == "over budget" else 0)  # scripts can trust the exit code
    assert f"budget {expected} (" in result.stdout
    assert sum(adapted["channels"].values()) < sum(report["original"]["channels"].values())
    assert baseline["alpha"] < 0.25 and baseline["estimated_ms"] <= budget["estimated_ms"] and baseline["epochs"] == 1
    assert 0 <= adapted["test_accuracy"] <= 1 and 0 <= adapted["tflite_test_accuracy"] <= 1
    markdown = (out / "report.md").read_text()
    assert "| measured latency (.tflite, whole model) |" in markdown and "width multiplier α=" in markdown
    assert f"- Verdict on host: **{expected}**" in markdown
    assert markdown.count("the search went on") == len(recalibrations)
    assert f"report: {out / 'report.md'}" in result.stdout


def test_cli_work_exits_2_on_bad_input_130_on_ctrl_c_and_lets_bugs_through(capsys):
    from adapter.errors import AdapterError
    from lut.cli import run_command as exit_code_of
    from lut.spec import LutError
    from profiler.errors import ProfilerError

    def failing(error):
        def work():
            raise error
        return work

    assert exit_code_of("prog", lambda: 7, on_interrupt="rerun") == 7
    for error in (AdapterError("bad --budget"), LutError("bad LUT"), ProfilerError("no device")):
        assert exit_code_of("prog", failing(error), on_interrupt="rerun") == 2
        assert capsys.readouterr().err == f"prog: error: {error}\n"
    assert exit_code_of("prog", failing(KeyboardInterrupt()), on_interrupt="run it again") == 130
    assert capsys.readouterr().err == "prog: interrupted; run it again\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        exit_code_of("prog", lambda: 1 / 0, on_interrupt="rerun")


def test_resume_reuses_the_fine_tuned_model_only_if_it_is_the_searchs_model(files, tmp_path, capsys):
    from types import SimpleNamespace

    from adapter.adapt import _long_term
    from adapter.latency import Budget
    from adapter.pruning.surgery import channel_counts, prune_to_counts
    from adapter.search.netadapt import NetAdaptConfig

    original = keras.models.load_model(files["model"])
    searched = SimpleNamespace(model=prune_to_counts(original, {"conv_pw_13": 64}))
    args, config = SimpleNamespace(resume=True), NetAdaptConfig(Budget(0.5, relative=True), long_term_epochs=0)
    original.save(tmp_path / "adapted.keras")  # fine-tuned before a resumed search went further
    model, _ = _long_term(args, SimpleNamespace(data=None), searched, config, tmp_path)
    assert "reusing" not in capsys.readouterr().out and channel_counts(model)["conv_pw_13"] == 64
    assert channel_counts(keras.models.load_model(tmp_path / "adapted.keras")) == channel_counts(model)
    again, _ = _long_term(args, SimpleNamespace(data=None), searched, config, tmp_path)
    assert "reusing" in capsys.readouterr().out and channel_counts(again) == channel_counts(model)


@pytest.mark.slow
def test_an_int8_lut_adapts_for_int8_measuring_the_int8_models_with_the_float_one_beside(files, tmp_path):
    from lut.tflite_ops import op_details

    model = keras.models.load_model(files["model"])
    lut = write_synthetic_lut(tmp_path / "host-int8.sqlite", [model], device="host", dtype="int8")
    argv = _argv(files, tmp_path, **{"--lut": lut}) + ["--lut-tolerance", "100000"]  # synthetic: not this machine
    result = subprocess.run([sys.executable, "-m", "adapter.adapt", *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode in (0, 1), result.stderr[-3000:]
    out = tmp_path / "out"
    assert "the LUT is int8: models are measured and exported as int8" in result.stdout
    # The deployed models are int8 (the search's candidates too); the float model is exported beside.
    for name in ("original", "adapted", "search"):
        ops = [op["opcode"] for op in op_details((out / f"{name}.tflite").read_bytes())]
        assert ops[0] == "QUANTIZE" and ops[-1] == "DEQUANTIZE", name
    beside = op_details((out / "adapted_float32.tflite").read_bytes())
    assert beside[0]["opcode"] == "CONV_2D" and beside[0]["inputs"][0]["dtype"] == "float32"
    report = json.loads((out / "report.json").read_text())
    adapted, budget = report["adapted"], report["budget"]
    assert report["lut"]["dtype"] == "int8" and adapted["dtype"] == "int8"
    assert adapted["measured_ms"] > 0 and adapted["float32"]["measured_ms"] > 0
    assert 0 < adapted["tflite_test_accuracy"] <= 1 and 0 < adapted["float32"]["tflite_test_accuracy"] <= 1
    assert budget["measured_fraction"] == pytest.approx(adapted["measured_ms"] / report["original"]["measured_ms"],
                                                        rel=0.25)  # the median of the rounds' ratios, not of medians
    assert "float32 export beside the int8 one" in (out / "report.md").read_text()
