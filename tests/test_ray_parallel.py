"""NetAdapt's proposals on a real local Ray cluster (profiler.cluster, adapter.search.netadapt.parallel).

One iteration of a tiny MobileNetV1 on its synthetic LUT is run serially at one TensorFlow
thread (in a subprocess, so the thread count holds), on one and on two Ray workers of one
thread each, and on two workers both killed with SIGKILL as the first proposal comes back:
every proposal's holdout accuracy and loss, and the chosen one, are the same in all four.
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.adapt import run_cli
from adapter.search import netadapt
from profiler.cluster import ClusterConfig, open_cluster
from profiler.errors import ProfilerError
from tests.test_adapt_cli import _argv, files  # noqa: F401  (files: a fixture)
from tests.test_netadapt import _config, small_data, v1, write_synthetic_lut  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def _rows(model, data, lut, out, cluster=None, done=None) -> list[tuple]:
    from lut.latency import LatencyEstimator
    from lut.table import LatencyTable

    with LatencyTable.open(lut) as table:
        run = netadapt.prepare_run(model, data, LatencyEstimator(table), _config(short_term_steps=STEPS), out,
                                   log=lambda line: None, cluster=cluster)
        if done is not None:
            run.trainer.done = done(run.trainer.pool.pids())
        previous = netadapt.IterationRecord(0, "", 0, {}, run.original_ms, run.original_ms, 0.0, 0, 0.0)
        _, rows, _ = netadapt.run_iteration(run, 1, model, previous)
    return [(r["group"], r["count"], r["holdout_accuracy"], r["train_loss"], r["chosen"]) for r in rows]


def _in_one_thread(function: str, *args) -> list[tuple]:
    """`function(*args)` of this module, serially in a process whose TensorFlow has one thread (as
    each worker has): its JSON rows."""
    script = (
        "import sys, json, tensorflow as tf\n"
        "tf.config.threading.set_intra_op_parallelism_threads(1)\n"
        "tf.config.threading.set_inter_op_parallelism_threads(1)\n"
        "import tests.test_ray_parallel as here\n"
        "print(json.dumps(getattr(here, sys.argv[1])(*sys.argv[2:])))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script, function, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [tuple(row) for row in json.loads(done.stdout.strip().splitlines()[-1])]


def _serial_netadapt(lut: str, out: str) -> list[tuple]:
    """The fixtures' model and data, built as pytest builds them, and the serial rows."""
    return _rows(v1.__wrapped__(), small_data.__wrapped__(), lut, out)


def _kill_all_after_the_first(pids: list[int]):
    fired = []

    def done(index: int, result) -> None:
        if not fired:  # the other worker is mid-proposal; the freed one is killed before its next
            fired.append(index)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

    return done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_proposals_on_ray_workers_are_the_serial_runs_even_when_workers_are_killed(v1, small_data, tmp_path):  # noqa: F811
    lut = write_synthetic_lut(tmp_path / "synthetic.sqlite", [v1])
    serial = _in_one_thread("_serial_netadapt", lut, tmp_path / "serial")
    assert len(serial) >= 5 and sum(row[-1] for row in serial) == 1
    with open_cluster(ClusterConfig(2, threads_per_worker=1)):
        two = _rows(v1, small_data, lut, tmp_path / "two", ClusterConfig(2, threads_per_worker=1))
        one = _rows(v1, small_data, lut, tmp_path / "one", ClusterConfig(1, threads_per_worker=1))
        killed = _rows(v1, small_data, lut, tmp_path / "killed", ClusterConfig(2, threads_per_worker=1),
                       done=_kill_all_after_the_first)
    assert two == serial
    assert one == serial
    assert killed == serial  # every proposal once, none lost or counted twice, the same figures


def test_cluster_settings_are_checked():
    with pytest.raises(ProfilerError, match="workers must be a positive integer"):
        ClusterConfig(0)
    with pytest.raises(ProfilerError, match="gpus_per_task"):
        ClusterConfig(1, gpus_per_task=-1)
    assert ClusterConfig(2, threads_per_worker=3).threads() == 3
    assert ClusterConfig(os.cpu_count() or 1).threads() == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_adapt_on_two_workers_runs_the_search_and_reports(files, tmp_path, capsys):  # noqa: F811
    argv = _argv(files, tmp_path, **{"--workers": "2", "--threads-per-worker": "1"}) + ["--rates"]
    assert run_cli(argv) in (0, 1)  # 1: the budget not met by the device's verdict, a figure of the host
    out = capsys.readouterr().out
    assert "fine-tuning proposals on 2 workers of a local Ray cluster, 1 threads each" in out
    assert re.search(r"proposal \d+ done; proposals/min: worker \d [\d.]+", out)  # each worker's pace, on request
    history = netadapt.read_history(tmp_path / "out")
    assert len(history) >= 2 and (tmp_path / "out" / "report.md").is_file()
    import ray

    assert not ray.is_initialized()  # the command's local cluster stopped with it


@pytest.mark.parametrize("option, value", [("--workers", "-1"), ("--threads-per-worker", "0"),
                                           ("--gpus-per-task", "-1")])
def test_bad_cluster_options_exit_2_in_one_line(files, tmp_path, capsys, option, value):  # noqa: F811
    with pytest.raises(SystemExit) as exit_:
        run_cli(_argv(files, tmp_path, **{"--workers": "2", option: value}))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(f"python -m adapter.adapt: error: argument {option}")


def _chamnet_rows(npz, out, cluster=None, lines=None) -> list[tuple]:
    """ChamNet's predictor build around a tiny MobileNetV2: its candidates, by candidate."""
    import keras

    from adapter.search.chamnet.build import candidate_of
    from adapter.search.chamnet.candidates import CandidateTrainer, Recipe, build_predictor, open_store
    from adapter.search.chamnet.space import SearchSpace
    from adapter.training.sources import load_dataset
    from lut.models import build_model

    keras.utils.set_random_seed(3)
    base = build_model("mobilenet_v2", alpha=0.25, resolution=32, classes=10)
    trainer = CandidateTrainer(base, str(npz), holdout=100, seed=0, recipe=Recipe(steps=4, batch_size=32),
                               load_dataset=load_dataset)
    space = SearchSpace.around(candidate_of(base), step=8, grow=1.0)
    with open_store(out) as store:
        build_predictor(trainer, space, store, total=5, initial=3, held_out=2, per_round=2, pool=64,
                        progress=(lines.append if lines is not None else lambda line: None), cluster=cluster)
        rows = store.rows("candidates")
    return sorted((r["role"], r["candidate"], r["holdout_accuracy"]) for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chamnet_candidates_on_ray_workers_are_the_serial_runs(small_data, tmp_path):  # noqa: F811
    from tests.test_netadapt import small_npz

    npz = small_npz(small_data, tmp_path / "small.npz")
    serial = _in_one_thread("_chamnet_rows", npz, tmp_path / "serial")
    assert [role for role, *_ in serial].count("bo1") == 2 and len(serial) == 7
    lines: list[str] = []
    with open_cluster(ClusterConfig(2, threads_per_worker=1)):
        two = _chamnet_rows(npz, tmp_path / "two", ClusterConfig(2, threads_per_worker=1, show_rates=True), lines)
    assert two == serial  # the same candidates (Bayesian optimization's picks included), the same accuracies
    assert all(re.search(r"candidates/min: worker \d [\d.]+", line) for line in lines) and len(lines) == 7
