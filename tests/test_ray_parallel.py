"""NetAdapt's proposals on a real local Ray cluster (adapter.cluster, adapter.search.netadapt.parallel).

One iteration of a tiny MobileNetV1 on its synthetic LUT is run serially at one TensorFlow
thread (in a subprocess, so the thread count holds), on one and on two Ray workers of one
thread each, and on two workers both killed with SIGKILL as the first proposal comes back:
every proposal's holdout accuracy and loss, and the chosen one, are the same in all four.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.cluster import ClusterConfig, open_cluster
from adapter.errors import AdapterError
from adapter.search import netadapt
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


def _serial_one_thread(lut, out) -> list[tuple]:
    """The serial run's rows, in a process whose TensorFlow has one thread (as each worker has)."""
    script = (
        "import sys, json, tensorflow as tf\n"
        "tf.config.threading.set_intra_op_parallelism_threads(1)\n"
        "tf.config.threading.set_inter_op_parallelism_threads(1)\n"
        "from tests.test_ray_parallel import _serial_main\n"
        "print(json.dumps(_serial_main(sys.argv[1], sys.argv[2])))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script, str(lut), str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return [tuple(row) for row in json.loads(done.stdout.strip().splitlines()[-1])]


def _serial_main(lut: str, out: str) -> list[tuple]:
    """The fixtures' model and data, built as pytest builds them, and the serial rows."""
    return _rows(v1.__wrapped__(), small_data.__wrapped__(), lut, out)


def _kill_all_after_the_first(pids: list[int]):
    fired = []

    def done(index: int) -> None:
        if not fired:  # the other worker is mid-proposal; the freed one is killed before its next
            fired.append(index)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

    return done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_proposals_on_ray_workers_are_the_serial_runs_even_when_workers_are_killed(v1, small_data, tmp_path):  # noqa: F811
    lut = write_synthetic_lut(tmp_path / "synthetic.sqlite", [v1])
    serial = _serial_one_thread(lut, tmp_path / "serial")
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
    with pytest.raises(AdapterError, match="workers must be a positive integer"):
        ClusterConfig(0)
    with pytest.raises(AdapterError, match="gpus_per_task"):
        ClusterConfig(1, gpus_per_task=-1)
    assert ClusterConfig(2, threads_per_worker=3).threads() == 3
    assert ClusterConfig(os.cpu_count() or 1).threads() == 1
