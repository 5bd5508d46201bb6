"""adapter.adapt as a script sees it: rerunning the same command resumes the run in --out,
other settings are refused before anything is loaded or rewritten, and the exit code says
whether the budget was met."""
from __future__ import annotations

import pytest

from adapter.adapt import run_cli
from adapter.report import budget_met
from tests.test_adapt_cli import _argv, files  # noqa: F401  (files: the tiny model, its LUT, a small .npz)


def _snapshot(folder) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rerunning_the_same_command_resumes_and_other_settings_are_refused_untouched(files, tmp_path, capsys):  # noqa: F811
    argv = _argv(files, tmp_path)
    assert run_cli(argv) == 0
    first = capsys.readouterr().out
    out = tmp_path / "out"
    history = (out / "history.csv").read_text()
    iterations = len(history.splitlines()) - 2  # header and iteration 0
    assert iterations >= 1 and "report: " in first

    before = _snapshot(out)
    assert run_cli(_argv(files, tmp_path, **{"--decay": "0.9", "--budget": "0.5"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"python -m adapter.adapt: error: --out {out} holds a NetAdapt run started with other settings "
        "(--budget 0.6 of the original then, 0.5 of the original now; --decay 1.0 then, 0.9 now); expected the same "
        "settings to resume it. Rerun with the settings it was started with, or choose another --out."
    ]
    assert _snapshot(out) == before  # nothing loaded, measured or rewritten before deciding

    assert run_cli(argv) == 0  # the same command again: no --resume needed
    again = capsys.readouterr().out
    assert f"resuming the NetAdapt run in {out} (started with the same settings)" in again
    assert f"resuming after iteration {iterations} of the run in {out}" in again
    assert (out / "history.csv").read_text() == history  # the search was complete: no iteration twice
    assert run_cli(argv + ["--resume"]) == 0  # --resume is still accepted
    capsys.readouterr()


@pytest.mark.timeout(60)
def test_the_exit_code_says_whether_the_budget_was_met():
    # the device's verdict when it took one, else the LUT estimate's
    for status, met in (("met", True), ("over-pruned", True), ("over budget", False), ("not taken", False)):
        assert budget_met({"status": status, "met_by_estimate": True}) is met
    assert budget_met({"status": "not measured", "met_by_estimate": True}) is True
    assert budget_met({"status": "not measured", "met_by_estimate": False}) is False


@pytest.mark.timeout(300)
def test_a_budget_too_small_to_meet_is_reported_as_requested_before_any_training(files, tmp_path, capsys):  # noqa: F811
    assert run_cli(_argv(files, tmp_path, **{"--budget": "0.001"})) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("python -m adapter.adapt: error: --budget 0.001 asks for 0.001 of the original: The budget ")
    assert "Traceback" not in line
    assert not (tmp_path / "out" / "history.csv").exists()
