"""Ray for training in parallel: a local cluster the command starts and stops (`--workers N`), or
an existing one it joins (`--ray-address`), and a pool of actors that each hold one trainer.

A task that a dying worker leaves behind is run again on a restarted actor (`MAX_RETRIES`); the
driver keeps the run store, so nothing committed is lost and nothing is counted twice.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from profiler.errors import ProfilerError

__all__ = ["MAX_RETRIES", "Cluster", "ClusterConfig", "add_cluster_arguments", "cluster_config", "open_cluster",
           "set_worker_threads"]

MAX_RETRIES = 3  # restarts of a dead actor, and retries of the task it was running
_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore", "RAY_DEDUP_LOGS": "0"}


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Where tasks run: `workers` actors on a local cluster, or on the cluster at `address`.

    `threads_per_worker` None gives each local worker an equal share of this machine's cores;
    `gpus_per_task` reserves that many GPUs for each worker (one proposal per GPU with 1).
    """

    workers: int = 1
    address: str | None = None
    threads_per_worker: int | None = None
    gpus_per_task: float = 0.0
    show_rates: bool = False  # say each worker's pace as its tasks finish

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ProfilerError(f"workers must be a positive integer; received {self.workers!r}.")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ProfilerError(f"threads_per_worker must be a positive integer; received {self.threads_per_worker!r}.")
        if self.gpus_per_task < 0:
            raise ProfilerError(f"gpus_per_task must be ≥ 0; received {self.gpus_per_task!r}.")

    def threads(self) -> int:
        return self.threads_per_worker or max(1, (os.cpu_count() or 1) // self.workers)


def add_cluster_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--workers`, `--ray-address`, `--threads-per-worker` and `--gpus-per-task`."""
    from lut.cli import non_negative_int, number, positive_int

    add = parser.add_argument
    add("--workers", type=non_negative_int, default=0,
        help="train in parallel on N Ray workers of a local cluster started and stopped by this command "
             "(default: 0, in this process); results are the serial run's")
    add("--ray-address", help="train on the workers of an existing Ray cluster (e.g. ray://head:10001 or auto)")
    add("--threads-per-worker", type=positive_int, help="TensorFlow threads of each worker (default: the cores shared equally)")
    add("--gpus-per-task", type=number(float, 0, open_low=False), default=0.0, help="GPUs reserved for each worker (default: %(default)s)")
    add("--rates", action="store_true", help="say each worker's tasks per minute as its tasks finish")


def cluster_config(args: argparse.Namespace) -> ClusterConfig | None:
    """The parsed arguments' cluster, or None to train in this process."""
    if not args.workers and not args.ray_address:
        return None
    return ClusterConfig(max(args.workers, 1), args.ray_address, args.threads_per_worker, args.gpus_per_task, args.rates)


class Cluster:
    """A pool of Ray actors of one class, each made with the same arguments and the threads it
    may use (an actor class takes them last, and has a `pid()`). The arguments are small values
    (a restarted actor is made with them again); what is large travels with the tasks (`map`).
    The actors stop when the pool is dropped."""

    def __init__(self, config: ClusterConfig, actor_class: type, *args: Any):
        import ray  # on use: the serial path and --help never load Ray

        options = {"num_cpus": config.threads(), "num_gpus": config.gpus_per_task,
                   "max_restarts": MAX_RETRIES, "max_task_retries": MAX_RETRIES}
        remote: Any = ray.remote(actor_class).options(**options)
        self.config = config
        self.actors = [remote.remote(*args, config.threads()) for _ in range(config.workers)]
        self._work = [[0, 0.0] for _ in self.actors]  # per actor: tasks finished, seconds they took

    def map(self, method: str, items: Sequence[Any], *shared: Any,
            done: Callable[[int, Any], None] | None = None) -> list[Any]:
        """`actor.method(*shared, item)` for every item, spread over the actors, results in order.

        `shared` values are put in Ray's object store once and handed to every task by reference
        (wrapped in a list, so a worker fetches one only when it changes); `done(i, result)` is
        called as item i finishes (to commit it at once).
        """
        import ray

        boxes = [[ray.put(value)] for value in shared]
        free = list(range(len(self.actors)))
        pending: dict[Any, tuple[int, int, float]] = {}
        results: list[Any] = [None] * len(items)
        queue = list(enumerate(items))
        while queue or pending:
            while queue and free:
                index, item = queue.pop(0)
                actor = free.pop()
                pending[getattr(self.actors[actor], method).remote(*boxes, item)] = (index, actor, time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1)
            index, actor, started = pending.pop(ready[0])
            results[index] = ray.get(ready[0])
            self._work[actor][0] += 1
            self._work[actor][1] += time.monotonic() - started
            free.append(actor)
            if done is not None:
                done(index, results[index])
        return results

    def rates(self) -> dict[str, float]:
        """Tasks per minute of each worker that finished one, over the time its tasks took."""
        return {f"worker {i}": 60 * tasks / seconds for i, (tasks, seconds) in enumerate(self._work) if seconds > 0}

    def describe_rates(self, unit: str) -> str:
        """`rates()` in words: "proposals/min: worker 0 1.20, worker 1 1.18"."""
        return f"{unit}/min: " + ", ".join(f"{name} {rate:.2f}" for name, rate in self.rates().items())

    def pids(self) -> list[int]:
        """The actors' process ids (for fault tests and per-worker rates)."""
        import ray

        return ray.get([actor.pid.remote() for actor in self.actors])


def set_worker_threads(threads: int) -> None:
    """TensorFlow's thread counts in a worker: call before its first op (before it gets a model)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


@contextlib.contextmanager
def open_cluster(config: ClusterConfig) -> Iterator[None]:
    """Ray started for the block: a local cluster of `config.workers` × threads CPUs, or the one
    at `config.address`; shut down after (a local cluster stops with it)."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is a dependency
        raise ProfilerError("--workers and --ray-address need Ray: pip install 'ray>=2.9'") from e
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                              "runtime_env": {"env_vars": _QUIET_ENV}}
    if config.address:
        kwargs["address"] = config.address
    else:
        kwargs["num_cpus"] = config.workers * config.threads()
        kwargs["num_gpus"] = config.workers * config.gpus_per_task if config.gpus_per_task else 0
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {config.address}" if config.address else "a local Ray cluster"
        raise ProfilerError(f"Could not start or join {where}: {str(e).splitlines()[0]}") from e
    try:
        yield
    finally:
        ray.shutdown()
