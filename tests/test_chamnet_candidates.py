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
from adapter.search.chamnet.candidates import (  # noqa: E402
    CandidateTrainer,
    MacsRegion,
    Recipe,
    build_predictor,
    open_store,
)
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
    with open_store(tmp_path / "cham") as store, pytest.raises(SpaceError, match="built for another region"):
        build_predictor(_trainer(base, npz), space, store, region=MacsRegion(0.2, 0.9), **sizes)


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


def test_a_holdout_larger_than_the_one_the_base_never_trained_on_is_refused_before_any_training(
        base, small_data, tmp_path):  # noqa: F811
    from adapter.train import SPLIT_SEED, TrainingRecord, record_path

    model, npz, out = tmp_path / "base.keras", small_npz(small_data, tmp_path / "small.npz"), tmp_path / "cham"
    base.save(model)
    TrainingRecord(model="mobilenet_v2", alpha=0.25, resolution=32, classes=10, weights=None, data=str(npz),
                   holdout=50, split_seed=SPLIT_SEED, seed=0, epochs=1, batch_size=32, lr=1e-3, optimizer="adam",
                   augment=False, train_images=len(small_data.train), test_images=len(small_data.test),
                   test_accuracy=0.1, seconds=1.0, seconds_per_epoch=1.0).save(record_path(model))
    refused = subprocess.run(_build_command(model, npz, out), capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).parents[1])  # --holdout 100: 50 of them the base trained on
    assert refused.returncode == 2 and "--holdout 100 is larger than the 50 images" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (out / "run.sqlite").exists()


def _chamnet(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "adapter.chamnet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parents[1])


@pytest.mark.timeout(1200)  # two CLI searches, a comparison and a LUT build: past 600 s on a loaded 2-core VM
def test_the_stored_predictor_is_retargeted_its_winner_trained_measured_and_reported(base, small_data, tmp_path):  # noqa: F811
    import csv
    import json

    from adapter.search.chamnet.build import build
    from adapter.search.chamnet.space import Candidate
    from tests.conftest import LENIENT_FLAGS

    # the LUT is built with the monitor opened wide: how well it predicts this machine is not what is tested here
    lenient = (*LENIENT_FLAGS, "--lut-tolerance", "1000")

    model, npz, cham, lut = tmp_path / "base.keras", small_npz(small_data, tmp_path / "small.npz"), tmp_path / "cham", \
        tmp_path / "space.sqlite"
    build(Candidate.parse("v2 r32 c16 | 16x1 32x2e6s2 32x2e6s2 64x2e6s2 | l128"), 10).save(model)  # on the step-16 grid
    built = _chamnet("build-predictor", "--model", model, "--data", npz, "--out", cham, "--step", "16", "--grow", "1",
                     "--steps", "2", "--batch-size", "32", "--holdout", "100", "--total", "4", "--initial", "4",
                     "--held-out", "2")
    assert built.returncode == 0, built.stderr[-2000:]
    # one pass: what is tested is the retargeting, not the space LUT's passes (tests/test_monitor.py)
    made = _chamnet("build-lut", "--predictor", cham, "--device", "host", "--out", lut, "--no-progress", "--passes", "1",
                    *LENIENT_FLAGS)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "entries for chamnet_mobilenet_v2_32" in made.stderr

    search = _chamnet("search", "--predictor", cham, "--lut", lut, "--budget", "0.6", "--out", tmp_path / "s60",
                      "--epochs", "1", "--generations", "5", "--population", "16", *lenient)
    assert search.returncode in (0, 1), search.stderr[-2000:]
    assert "measuring" not in search.stdout.split("searched")[0]  # the space's LUT left nothing to measure
    report = json.loads((tmp_path / "s60" / "report.json").read_text())
    assert report["search"]["method"] == "ChamNet" and report["budget"]["status"] in ("met", "over budget", "over-pruned")
    top = report["search"]["candidates"]
    assert top and all(c["estimated_ms"] <= report["budget"]["estimated_ms"] for c in top)
    assert report["adapted"]["candidate"] in {c["candidate"] for c in top}
    assert report["adapted"]["measured_ms"] > 0 and 0 <= report["adapted"]["test_accuracy"] <= 1
    assert report["search"]["device_checks"][0]["candidate"] == top[0]["candidate"]
    assert (tmp_path / "s60" / "adapted.tflite").is_file() and "ChamNet" in (tmp_path / "s60" / "report.md").read_text()

    # the comparison measures the run's model again with the original, in one interleaved measurement
    compared = subprocess.run([sys.executable, "-m", "adapter.compare", "--out", tmp_path / "cmp", tmp_path / "s60",
                               *LENIENT_FLAGS], capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert compared.returncode == 0, compared.stderr[-2000:]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| ChamNet | 0.6 of the original |" in table and (tmp_path / "cmp" / "compare.png").is_file()
    fraction = json.loads((tmp_path / "cmp" / "compare.json").read_text())["models"][0]["measured_fraction"]
    assert 0 < fraction < 1.5

    # another budget: a search of seconds, nothing trained
    with open(cham / "candidates.csv") as f:
        trained = list(csv.DictReader(f))
    again = _chamnet("search", "--predictor", cham, "--lut", lut, "--budget", "0.4", "--out", tmp_path / "s40",
                     "--search-only", "--generations", "5", "--population", "16", *lenient)
    assert again.returncode == 0, again.stderr[-2000:]
    with open(tmp_path / "s40" / "top.csv") as f:
        found = list(csv.DictReader(f))
    assert found and all(float(r["estimated_fraction"]) <= 0.4 + 1e-9 for r in found)
    with open(cham / "candidates.csv") as f:
        assert list(csv.DictReader(f)) == trained

    # a folder that holds no predictor, and a predictor of another base model: one line each, exit 2
    for folder in (tmp_path, ):
        refused = _chamnet("search", "--predictor", folder, "--lut", lut, "--budget", "0.5", "--out", tmp_path / "x")
        assert refused.returncode == 2 and "holds no ChamNet predictor" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_a_predictor_is_refused_for_another_base_model(base, tmp_path):
    from adapter.search.chamnet.run import StoredPredictor, check_base
    from lut.models import build_model

    space = SearchSpace.around(candidate_of(base), step=8)
    stored = StoredPredictor(tmp_path, {"base": space.base.text(), "classes": 10}, "base.keras", space, None, [], [],
                             None, None)
    check_base(stored, base, "base.keras")  # its own base passes
    with pytest.raises(SpaceError, match="was built for the base v2 r32"):
        check_base(stored, build_model("mobilenet_v1", alpha=0.25, resolution=32, classes=10), "v1.keras")
    with pytest.raises(SpaceError, match="10 classes"):
        check_base(stored, build_model("mobilenet_v2", alpha=0.25, resolution=32, classes=5), "five.keras")
