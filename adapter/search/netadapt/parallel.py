"""NetAdapt's proposals fine-tuned in parallel on Ray workers (`--workers N`, `--ray-address`).

Each worker is an actor holding the run's proposal trainer, traced once per worker. An
iteration's model and training images go into Ray's object store once; a worker fetches them on
its first proposal of the iteration. Each proposal is one task with the serial run's seed, so
the results are the serial run's (with the same threads per worker); a task whose worker dies
runs again on the restarted actor. The driver keeps the run store.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from adapter.cluster import Cluster, ClusterConfig
from adapter.search.netadapt.config import NetAdaptConfig
from adapter.search.netadapt.proposals import _Batches, _proposal_trainer

__all__ = ["ProposalWorker", "RayProposals"]


class ProposalWorker:
    """One Ray actor: a proposal trainer and the iteration it last fetched."""

    def __init__(self, model_box: list, config: NetAdaptConfig, threads: int):
        # imports TensorFlow: in the worker, before any op, so the thread counts still apply
        import ray
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.trainer = _proposal_trainer(ray.get(model_box[0]), config, log=lambda _: None)
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
            self.loaded = (key, model, analyze(model), self.trainer.model_weights(model), batches)
        _, model, graph, weights, batches = self.loaded
        times = dict.fromkeys(("surgery_s", "finetune_s", "evaluate_s"), 0.0)
        return (*self.trainer.train(model, graph, weights, keep, batches, times), times)


class RayProposals:
    """A `ProposalTrainer` that spreads an iteration's proposals over a pool of `ProposalWorker`s.

    Needs Ray started (`adapter.cluster.open_cluster`). The iteration record's fine-tune and
    evaluate seconds are the workers' summed; its total is the wall time.
    """

    def __init__(self, model: Any, config: NetAdaptConfig, cluster: ClusterConfig, log: Callable[[str], None]):
        import ray

        self.pool = Cluster(cluster, ProposalWorker, [ray.put(model)], config)
        self.done: Callable[[int], None] | None = None  # called with each proposal's index as it finishes
        where = f"the Ray cluster at {cluster.address}" if cluster.address else "a local Ray cluster"
        log(f"fine-tuning proposals on {cluster.workers} workers of {where}, {cluster.threads()} threads each")

    def train_all(self, iteration: int, model, keeps, batches: _Batches, times: dict) -> list[tuple]:
        results = self.pool.map("train", keeps, model, batches, done=self.done)
        for *_, worker_times in results:
            for key, seconds in worker_times.items():
                times[key] += seconds
        return [result[:4] for result in results]
