"""Arguments: every command answers --help at once, refuses zeros, non-finite and negative
numbers in one line (exit 2) instead of replacing them, and its loops are bounded."""
from __future__ import annotations

import math
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lut.cli import ArgumentParser, check_output_file, number, positive_int, run_command
from lut.errors import LutError, PhonefitError

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
COMMANDS = ("profiler.build_lut", "adapter.validate_lut", "lut.estimate", "adapter.train", "adapter.adapt",
            "adapter.baseline", "adapter.demo", "adapter.chamnet")


def _cli(*argv, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", COMMANDS)
def test_help_answers_in_under_two_seconds_without_loading_tensorflow(module):
    start = time.perf_counter()
    run = _cli("-m", module, "--help")
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: python -m {module}")
    assert run.stderr == ""
    assert seconds < 2.0, f"{module} --help took {seconds:.1f} s"


@pytest.mark.timeout(60)
def test_help_shows_each_default_once_and_every_option_of_validate_has_help():
    build = " ".join(_cli("-m", "profiler.build_lut", "--help").stdout.split())
    assert build.count("(default: 224)") == 1 and "(default: %" not in build
    assert "(pixels) (default: 224)" in build and "default: 8 on CPU" in build
    validate = _cli("-m", "adapter.validate_lut", "--help").stdout
    described = validate.split("options:")[1]
    for option in ("--alpha ALPHA", "--resolution RESOLUTION", "--classes CLASSES", "--seed SEED", "--no-progress"):
        after = described.split(option, 1)[1].split("\n  -", 1)[0]
        assert after.strip(), f"{option} has no help"
    assert "seed of the random channel counts (default: 0)" in " ".join(validate.split())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "argv, message",
    [
        (["profiler.build_lut", "--step", "0"], "argument --step: must be a positive integer. Received: '0'."),
        (["profiler.build_lut", "--alpha", "nan"], "argument --alpha: must be a positive number. Received: 'nan'."),
        (["profiler.build_lut", "--threads", "-1"], "argument --threads: must be a positive integer. Received: '-1'."),
        (["profiler.build_lut", "--backend", "npu"], "argument --backend: invalid choice: 'npu'"),
        (["adapter.validate_lut", "--lut", "x", "--samples", "0"], "argument --samples: must be a positive integer. Received: '0'."),
        (["adapter.validate_lut", "--lut", "x", "--repeats", "inf"], "argument --repeats: must be a positive integer. Received: 'inf'."),
        (["adapter.baseline", "--model", "m", "--lut", "l", "--budget", "0.5", "--out", "o", "--alpha-step", "0"],
         "argument --alpha-step: must be a number in (0, 1). Received: '0'."),
        (["adapter.baseline", "--model", "m", "--lut", "l", "--budget", "0.5", "--out", "o", "--alpha-step", "-0.1"],
         "argument --alpha-step: must be a number in (0, 1). Received: '-0.1'."),
        (["adapter.baseline", "--model", "m", "--lut", "l", "--budget", "0.5", "--out", "o", "--baseline-epochs", "0"],
         "argument --baseline-epochs: must be a positive integer. Received: '0'."),
        (["adapter.adapt", "--model", "m", "--lut", "l", "--budget", "0.5", "--out", "o", "--decay", "inf"],
         "argument --decay: must be a number in (0, 1]. Received: 'inf'."),
        (["adapter.train", "--out", "m.keras", "--lr=-inf"], "argument --lr: must be a positive number. Received: '-inf'."),
    ],
)
def test_zeros_and_non_finite_numbers_exit_2_in_one_line_before_any_work(tmp_path, argv, message):
    module, *options = argv
    run = _cli("-m", module, *options, cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m {module}: error: {message}"), run.stderr
    assert lines[0].endswith("(see --help)")
    assert list(tmp_path.iterdir()) == []  # nothing was created: no LUT at step 8, no run


@pytest.mark.timeout(60)
def test_number_types_refuse_what_is_not_a_finite_number_in_range():
    unit = number(float, 0, 1, open_high=True)
    assert unit("0.5") == 0.5
    for text in ("0", "1", "nan", "-0.1", "1e400", "half"):
        with pytest.raises(Exception, match=r"must be a number in \(0, 1\)\. Received: "):
            unit(text)
    assert positive_int("3") == 3
    for text in ("0", "-2", "2.5", ""):
        with pytest.raises(Exception, match="must be a positive integer"):
            positive_int(text)


@pytest.mark.timeout(60)
def test_the_width_grid_of_the_baseline_is_finite_and_refuses_steps_that_loop():
    from adapter.errors import AdapterError
    from adapter.search.width_multiplier import MAX_ALPHAS, alpha_grid

    assert alpha_grid(0.25, 0.1) == [0.15, 0.05]
    assert alpha_grid(0.25, 0.025)[-1] == 0.025 and len(alpha_grid(0.25, 0.025)) == 9
    for step in (0, -0.1, 0.25, 0.3, math.nan, math.inf):
        with pytest.raises(AdapterError, match=r"--alpha-step must be a positive number below the base model's α=0.25"):
            alpha_grid(0.25, step)
    with pytest.raises(AdapterError, match=rf"gives 249999 widths below α=0.25; expected at most {MAX_ALPHAS}"):
        alpha_grid(0.25, 1e-6)


@pytest.mark.timeout(60)
def test_the_runner_turns_bad_input_into_one_line_exit_2_and_ctrl_c_into_130(tmp_path, capsys):
    def failing(error):
        def work():
            raise error
        return work

    cases = {
        LutError("bad LUT"): "prog: error: bad LUT\n",
        PhonefitError("two\nlines"): "prog: error: two; lines\n",
        sqlite3.OperationalError("attempt to write a readonly database"):
            "prog: error: cannot write to a LUT: it is read-only (SQLite: attempt to write a readonly database); ",
        PermissionError(13, "Permission denied", str(tmp_path / "x")):
            f"prog: error: permission denied for {tmp_path / 'x'}: expected a path this user can read and write.",
        UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"):
            "prog: error: a file is not UTF-8 text: byte b'\\xff' at position 2 (invalid start byte); expected UTF-8.",
        OSError(28, "No space left on device", "/x"): "prog: error: No space left on device: /x.",
    }
    for error, start in cases.items():
        assert run_command("prog", failing(error), on_interrupt="rerun") == 2
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1, err
    assert run_command("prog", failing(KeyboardInterrupt()), on_interrupt="run it again") == 130
    assert capsys.readouterr().err == "prog: interrupted; run it again\n"
    assert run_command("prog", lambda: 1, on_interrupt="rerun") == 1  # the job's own verdict passes through
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_command("prog", lambda: 1 / 0, on_interrupt="rerun")


@pytest.mark.timeout(60)
def test_the_parser_error_is_one_line_exit_2(capsys):
    parser = ArgumentParser(prog="prog")
    parser.add_argument("--n", type=positive_int, required=True)
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["--n", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "prog: error: argument --n: must be a positive integer. Received: '0'. (see --help)\n"


@pytest.mark.timeout(60)
def test_output_checks_name_the_option_and_what_is_in_the_way(tmp_path):
    (tmp_path / "afile").write_text("x")
    afile = tmp_path / "afile"
    with pytest.raises(PhonefitError, match=re.escape(f"--out {afile}/l.sqlite cannot be created: {afile} is a file, not a folder")):
        check_output_file(tmp_path / "afile" / "l.sqlite")
    with pytest.raises(PhonefitError, match=re.escape(f"--json {tmp_path} is a folder; expected a file path")):
        check_output_file(tmp_path, "--json")
    assert check_output_file(tmp_path / "new" / "deeper" / "l.sqlite") == tmp_path / "new" / "deeper" / "l.sqlite"
    assert not (tmp_path / "new").exists()  # a check creates nothing


@pytest.mark.timeout(60)
def test_the_demo_takes_the_measuring_conditions_its_refusals_name_and_hands_them_to_adapt():
    import argparse

    from adapter.demo import _monitor_argv
    from profiler.monitor import add_monitor_arguments, monitor_policy

    parser = argparse.ArgumentParser()
    add_monitor_arguments(parser)
    given = parser.parse_args(["--wait-quiet", "120", "--tries", "6", "--tolerance", "12.5"])
    assert monitor_policy(parser.parse_args(_monitor_argv(given))) == monitor_policy(given)
    assert _monitor_argv(parser.parse_args([])) == []  # adapt's own defaults, as the demo's LUT build
    assert monitor_policy(parser.parse_args(_monitor_argv(parser.parse_args(["--no-monitor"])))) is None
    run = _cli("-m", "adapter.demo", "--wait-quiet", "-1")
    assert run.returncode == 2 and "argument --wait-quiet" in run.stderr, run.stderr
