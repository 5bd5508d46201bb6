"""Training ChamNet's candidates into the run store: each committed as it finishes, a rerun
goes on where the last one stopped, and a store of another recipe is refused."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lut.quiet_tf import import_tensorflow_quietly

import_tensorflow_quietly()

from adapter.search.chamnet.build import candidate_of  # noqa: E402
from adapter.search.chamnet.candidates import CandidateTrainer, Recipe, build_predictor, open_store  # noqa: E402
from adapter.search.chamnet.space import SearchSpace, SpaceError  # noqa: E402
from adapter.training.sources import load_dataset  # noqa: E402
from tests.test_netadapt import small_data, small_npz  # noqa: E402, F401 (small_data is a fixture)

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

TINY = Recipe(steps=2, batch_size=32)


@pytest.fixture(scope="module")
def base():
    import keras

    from lut.models import build_model

    keras.utils.set_random_seed(3)
    return build_model("mobilenet_v2", alpha=0.25, resolution=32, classes=10)


class _Counting(CandidateTrainer):
    """The real trainer, counting what it trains and able to stop (as Ctrl-C would) after `stop_after`."""

    def __init__(self, *args, stop_after: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained: list[str] = []
        self.stop_after = stop_after

    def train(self, candidate):
        if self.stop_after is not None and len(self.trained) == self.stop_after:
            raise KeyboardInterrupt
        self.trained.append(candidate.text())
        return super().train(candidate)


def _trainer(base, npz, recipe=TINY, **kwargs):
    return _Counting(base, str(npz), holdout=100, seed=0, recipe=recipe, load_dataset=load_dataset, **kwargs)


def test_the_predictor_build_commits_every_candidate_and_resumes_without_training_one_twice(
        base, small_data, tmp_path):  # noqa: F811 (the fixture)
    npz = small_npz(small_data, tmp_path / "small.npz")
    space = SearchSpace.around(candidate_of(base), step=8, grow=1.0)
    sizes = dict(total=5, initial=3, held_out=2, per_round=2, pool=64)

    first = _trainer(base, npz, stop_after=4)
    with open_store(tmp_path / "cham") as store, pytest.raises(KeyboardInterrupt):
        build_predictor(first, space, store, progress=lambda line: None, **sizes)
    with open_store(tmp_path / "cham") as store:
        kept = store.rows("candidates")
    assert [r["role"] for r in kept] == ["held_out", "held_out", "sobol", "sobol"]
    assert [r["candidate"] for r in kept] == first.trained

    second = _trainer(base, npz)
    with open_store(tmp_path / "cham") as store:
        built = build_predictor(second, space, store, progress=lambda line: None, **sizes)
        rows = store.rows("candidates")
    assert not set(second.trained) & set(first.trained) and len(second.trained) == 3  # 1 Sobol + 2 by expected improvement
    assert [r["role"] for r in rows] == ["held_out"] * 2 + ["sobol"] * 3 + ["bo1"] * 2
    assert len({(r["role"], r["candidate"]) for r in rows}) == 7
    assert all(0.0 <= r["holdout_accuracy"] <= 1.0 and r["macs"] > 0 for r in rows)
    assert built.quality.n == 2 and len(built.fitted) == 5 and np.isfinite(built.quality.rmse_points)
    assert (tmp_path / "cham" / "candidates.csv").read_text().count("\n") == 8  # a header and 7 rows

    with open_store(tmp_path / "cham") as store, pytest.raises(SpaceError, match="built for another recipe"):
        build_predictor(_trainer(base, npz, recipe=Recipe(steps=3, batch_size=32)), space, store, **sizes)


def _build_command(model, npz, out):
    return [sys.executable, "-m", "adapter.chamnet", "build-predictor", "--model", str(model), "--data", str(npz),
            "--out", str(out), "--steps", "2", "--batch-size", "32", "--holdout", "100", "--total", "4",
            "--initial", "3", "--held-out", "2", "--per-round", "1"]


def test_sigkill_during_the_predictor_build_then_the_same_command_finishes_it(base, small_data, tmp_path):  # noqa: F811
    import csv

    model, npz, out = tmp_path / "base.keras", small_npz(small_data, tmp_path / "small.npz"), tmp_path / "cham"
    base.save(model)
    command = _build_command(model, npz, out)
    cwd = Path(__file__).parents[1]
    killed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    before = []
    for line in killed.stdout:
        if "fitted on)" in line:
            before.append(line.split(":")[0])
            if len(before) == 3:
                killed.send_signal(signal.SIGKILL)  # no chance to clean up or commit anything more
                break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    after = [line.split(":")[0] for line in run.stdout.splitlines() if "fitted on)" in line]
    with open(out / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    trained = [f"{r['role']} {r['candidate']}" for r in rows]
    # every candidate committed before the kill kept, none trained again, the build finished
    assert trained[:3] == before and not set(after) & set(before)
    assert len(trained) == len(set(trained)) == 6 and [r["role"] for r in rows].count("held_out") == 2
    assert "predictor: Kendall τ" in run.stdout
