"""NetAdapt's proposals fine-tuned in parallel on Ray workers (`--workers N`, `--ray-address`).

Each worker is an actor holding the run's proposal trainer, traced once per worker. An
iteration's model and training images go into Ray's object store once; a worker fetches them on
its first proposal of the iteration. Each proposal is one task with the serial run's seed, so
the results are the serial run's (with the same threads per worker); a task whose worker dies
runs again on the restarted actor. The driver keeps the run store.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from adapter.search.netadapt.config import NetAdaptConfig
from adapter.search.netadapt.proposals import _Batches, _proposal_trainer
from profiler.cluster import Cluster, ClusterConfig, set_worker_threads

__all__ = ["ProposalWorker", "RayProposals"]


class ProposalWorker:
    """One Ray actor: a proposal trainer (made from its first task's model: every iteration's model
    has the same topology) and the iteration it last fetched."""

    def __init__(self, config: NetAdaptConfig, threads: int):
        set_worker_threads(threads)  # before any op: no model is sent with the actor, tasks bring it
        self.config = config
        self.trainer: Any = None
        self.loaded: tuple | None = None

    def pid(self) -> int:
        return os.getpid()

    def train(self, model_box: list, batches_box: list, keep: dict) -> tuple:
        """(accuracy, loss, tuned weights, Keras model, times) of one proposal."""
        import ray

        from adapter.pruning.graph import analyze

        key = model_box[0].hex()  # a new object per iteration (an iteration may be run again on another model)
        if self.loaded is None or self.loaded[0] != key:
            model, batches = ray.get(model_box[0]), ray.get(batches_box[0])
            if self.trainer is None:
                self.trainer = _proposal_trainer(model, self.config, log=lambda _: None)
            self.loaded = (key, model, analyze(model), self.trainer.model_weights(model), batches)
        _, model, graph, weights, batches = self.loaded
        times = dict.fromkeys(("surgery_s", "finetune_s", "evaluate_s"), 0.0)
        return (*self.trainer.train(model, graph, weights, keep, batches, times), times)


class RayProposals:
    """A `ProposalTrainer` that spreads an iteration's proposals over a pool of `ProposalWorker`s.

    Needs Ray started (`profiler.cluster.open_cluster`). The iteration record's fine-tune and
    evaluate seconds are the workers' summed; its total is the wall time.
    """

    def __init__(self, config: NetAdaptConfig, cluster: ClusterConfig, log: Callable[[str], None]):
        self.pool = Cluster(cluster, ProposalWorker, config)
        self._log = log
        self.done: Callable[[int, Any], None] | None = None  # called as each proposal finishes
        where = f"the Ray cluster at {cluster.address}" if cluster.address else "a local Ray cluster"
        log(f"fine-tuning proposals on {cluster.workers} workers of {where}, {cluster.threads()} threads each")

    def train_all(self, iteration: int, model, keeps, batches: _Batches, times: dict) -> list[tuple]:
        workers = len(self.pool.actors)
        with tqdm(total=len(keeps), desc=f"iteration {iteration} on {workers} workers", unit="proposal", leave=False,
                  disable=not sys.stderr.isatty()) as bar:
            def done(index: int, result: Any) -> None:
                rates = self.pool.rates()
                bar.set_postfix_str(" · ".join(f"{name} {rate:.1f}/min" for name, rate in rates.items()), refresh=False)
                bar.update()
                if self.pool.config.show_rates:
                    self._log(f"proposal {index} done; {self.pool.describe_rates('proposals')}")
                if self.done is not None:
                    self.done(index, result)

            results = self.pool.map("train", keeps, model, batches, done=done)
        for *_, worker_times in results:
            for key, seconds in worker_times.items():
                times[key] += seconds
        return [result[:4] for result in results]
