"""Training ChamNet's candidates and building its accuracy predictor from them, resumably.

Every candidate is trained with one recipe (`Recipe`), the same for all. The default is
*adapt, don't restart*: the candidate inherits the base's weights (`build.inherit`) and is
fine-tuned for a fixed number of steps, which makes tens of candidates affordable on a CPU;
`from_scratch_epochs` trains each from scratch instead (ChamNet's own protocol, for GPUs).
Accuracy is measured on the holdout carved out of the training data, never the test set.

`build_predictor` trains, in order, a held-out set (a Sobol sample of its own, never fitted
on: the predictor's quality is told on it), a Sobol sample to start from, then rounds of
Bayesian optimization (the candidates of highest expected improvement among a fresh Sobol
pool) until `total` candidates are fitted on. All three are kept to `region` (e.g. the MACs
around the budgets that matter: ChamNet samples where the search will look, and the quality
is told there too). Each candidate is committed to the run store as it finishes, so a run
killed at any point goes on where it stopped: a candidate is trained once, none is lost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from adapter.search.chamnet.build import build, inherit
from adapter.search.chamnet.predictor import (
    AccuracyPredictor,
    FlopsRegression,
    Quality,
    expected_improvement,
    macs,
    quality,
)
from adapter.search.chamnet.space import Candidate, SearchSpace, SpaceError
from adapter.search.run_store import RunStore
from profiler.cluster import Cluster, ClusterConfig, set_worker_threads

__all__ = ["CANDIDATE_FIELDS", "CandidateTrainer", "CandidateWorker", "MacsRegion", "PredictorBuild", "Recipe",
           "build_predictor", "open_store"]

CANDIDATE_FIELDS = ("step", "role", "candidate", "holdout_accuracy", "macs", "seconds")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How every candidate is trained (part of the predictor's identity: another recipe, another predictor)."""

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 128
    from_scratch_epochs: int = 0  # 0: inherit the base's weights and fine-tune for `steps`
    seed: int = 0

    def describe(self) -> str:
        if self.from_scratch_epochs:
            return f"from scratch for {self.from_scratch_epochs} epochs (batch {self.batch_size})"
        return f"inherit the base's weights, fine-tune {self.steps} steps of {self.batch_size} at lr {self.lr:g}"


@dataclasses.dataclass(frozen=True)
class MacsRegion:
    """The candidates of `low`..`high` times the base's MACs, where the budgets lie (part of the
    predictor's identity: another region, other candidates)."""

    low: float = 0.1
    high: float = 1.0

    def keeper(self, base: Candidate, classes: int) -> Callable[[Candidate], bool]:
        base_macs = macs(base, classes)
        return lambda c: self.low * base_macs <= macs(c, classes) <= self.high * base_macs


class CandidateTrainer:
    """Trains candidates of `base`'s space on `data_source` and measures their holdout accuracy."""

    def __init__(self, base_model, data_source: str, *, holdout: int, seed: int, recipe: Recipe,
                 load_dataset: Callable[..., Any]):
        from adapter.search.chamnet.build import candidate_of

        self.base_model, self.base = base_model, candidate_of(base_model)
        self.classes = int(base_model.output_shape[-1])
        self.source, self.holdout, self.seed, self.recipe = data_source, holdout, seed, recipe
        self._load_dataset = load_dataset
        self._data: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": {}}  # a worker loads its own data: once per worker and resolution

    def data(self, resolution: int):
        """The splits at `resolution` (loaded once per resolution: the same images, resized)."""
        if resolution not in self._data:
            from adapter.train import SPLIT_SEED  # the base model's split: its holdout images it never trained on

            self._data[resolution] = self._load_dataset(self.source, resolution=resolution, holdout=self.holdout,
                                                        seed=SPLIT_SEED)
        return self._data[resolution]

    def train(self, candidate: Candidate) -> tuple[float, float]:
        """(holdout accuracy, seconds) of `candidate` trained by the recipe, seeded by the recipe's seed
        and the candidate alone (the same figures in any order, on any worker with the same threads)."""
        import keras

        from adapter.train import evaluate_split, fit

        start, recipe, data = time.perf_counter(), self.recipe, self.data(candidate.resolution)
        digest = hashlib.sha256(f"{recipe.seed}:{candidate.text()}".encode()).digest()
        keras.utils.set_random_seed(int.from_bytes(digest[:4], "little"))
        model = build(candidate, self.classes)
        if recipe.from_scratch_epochs:
            fit(model, data.train, epochs=recipe.from_scratch_epochs, batch_size=recipe.batch_size, seed=recipe.seed)
        else:
            inherit(model, candidate, self.base_model, self.base)
            fit(model, data.train, steps=recipe.steps, lr=recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed)
        return evaluate_split(model, data.holdout), time.perf_counter() - start


class CandidateWorker:
    """One Ray actor: a `CandidateTrainer`, fetched with its first task (its data then loaded once
    per worker and resolution)."""

    def __init__(self, threads: int):
        set_worker_threads(threads)  # before any op: the trainer's base model comes with the tasks
        self.trainer: CandidateTrainer | None = None

    def pid(self) -> int:
        return os.getpid()

    def train(self, trainer_box: list, text: str) -> tuple[float, float]:
        if self.trainer is None:
            import ray

            self.trainer = ray.get(trainer_box[0])
        return self.trainer.train(Candidate.parse(text))


def open_store(out) -> RunStore:
    return RunStore(out, {"candidates": ("candidates.csv", CANDIDATE_FIELDS)}, state_file="chamnet.json")


@dataclasses.dataclass
class PredictorBuild:
    """What `build_predictor` made: the fitted predictor and how good it is on the held-out set."""

    predictor: AccuracyPredictor
    fitted: list[dict[str, Any]]
    held_out: list[dict[str, Any]]
    quality: Quality
    flops_quality: Quality


def _in_order(rows) -> list[dict[str, Any]]:
    """Rows by candidate: the fits do not depend on the order parallel workers finished in."""
    return sorted(rows, key=lambda r: r["candidate"])


def _identity(trainer: CandidateTrainer, space: SearchSpace, region: MacsRegion | None) -> dict[str, Any]:
    return {"base": trainer.base.text(), "classes": trainer.classes, "data": str(trainer.source),
            "holdout": trainer.holdout, "seed": trainer.seed, "recipe": dataclasses.asdict(trainer.recipe),
            "space": {"step": space.step, "grow": space.grow, "extra_blocks": space.extra_blocks,
                      "expansions": list(space.expansions), "resolutions": list(space.resolutions)},
            "region": None if region is None else dataclasses.asdict(region)}


def build_predictor(trainer: CandidateTrainer, space: SearchSpace, store: RunStore, *, total: int = 60,
                    initial: int = 24, held_out: int = 12, per_round: int = 6, pool: int = 2048,
                    region: MacsRegion | None = None, model_path: str | None = None,
                    progress: Callable[[str], None] = print, cluster: ClusterConfig | None = None) -> PredictorBuild:
    """Train candidates into `store` until `total` are fitted on (see the module doc); resumes.
    `model_path` (the base model's file) is kept in the store's state for the search to load.
    `cluster` (Ray started by the caller) trains each set's candidates in parallel on its workers,
    each committed as it arrives; the figures are the serial run's at the same threads per worker."""
    identity = _identity(trainer, space, region)
    keep = None if region is None else region.keeper(space.base, trainer.classes)
    state = store.state()
    if state is not None and state.get("identity") != identity:
        changed = sorted(k for k in identity if state.get("identity", {}).get(k) != identity[k])
        raise SpaceError(f"{store.out} holds a predictor built for another {', '.join(changed)}; expected the same "
                         "base model, data, recipe, space and region. Use another --out for a new predictor.")
    store.set_state({"identity": identity, "model": model_path or (state or {}).get("model")})
    rows = store.rows("candidates")
    done = {(r["role"], r["candidate"]) for r in rows}

    workers = None if cluster is None else Cluster(cluster, CandidateWorker)

    def train(candidates: list[Candidate], role: str) -> None:
        todo = [c for c in candidates if (role, c.text()) not in done]

        def commit(index: int, result: tuple[float, float]) -> None:
            (accuracy, seconds), candidate = result, todo[index]
            row = {"step": len(rows), "role": role, "candidate": candidate.text(), "holdout_accuracy": accuracy,
                   "macs": macs(candidate, trainer.classes), "seconds": round(seconds, 1)}
            store.commit_step(len(rows), {"candidates": [row]})
            rows.append(row)
            done.add((role, candidate.text()))
            fitted = sum(r["role"] != "held_out" for r in rows)
            rates = f"; {workers.describe_rates('candidates')}" if workers is not None and workers.config.show_rates else ""
            progress(f"{role} {candidate.text()}: holdout {accuracy:.4f} in {seconds:.0f} s ({fitted}/{total} fitted "
                     f"on){rates}")

        if workers is None:
            for index, candidate in enumerate(todo):
                commit(index, trainer.train(candidate))
        else:
            workers.map("train", [c.text() for c in todo], trainer, done=commit)

    train(space.sample(held_out, seed=trainer.seed + 1, keep=keep), "held_out")
    train(space.sample(min(initial, total), seed=trainer.seed, keep=keep), "sobol")
    predictor = AccuracyPredictor(space, seed=trainer.seed)
    bo_round = 0
    while (fitted := _in_order(r for r in rows if r["role"] != "held_out")) and len(fitted) < total:
        predictor.fit([Candidate.parse(r["candidate"]) for r in fitted], [r["holdout_accuracy"] for r in fitted])
        taken = {r["candidate"] for r in rows}
        options = [c for c in space.sample(pool, seed=trainer.seed + 100 + bo_round)
                   if c.text() not in taken and (keep is None or keep(c))]
        if not options:
            raise SpaceError("No untrained candidate of the space lies in the region the predictor is built for; "
                             "widen the space or the region.")
        mean, std = predictor.predict(options)
        gain = expected_improvement(mean, std, best=max(r["holdout_accuracy"] for r in fitted))
        train([options[int(i)] for i in np.argsort(-gain)[: min(per_round, total - len(fitted))]], f"bo{bo_round + 1}")
        bo_round += 1
    fitted = _in_order(r for r in rows if r["role"] != "held_out")
    tested = _in_order(r for r in rows if r["role"] == "held_out")
    fit_candidates = [Candidate.parse(r["candidate"]) for r in fitted]
    fit_accuracy = [r["holdout_accuracy"] for r in fitted]
    predictor.fit(fit_candidates, fit_accuracy)
    test_candidates = [Candidate.parse(r["candidate"]) for r in tested]
    truth = [r["holdout_accuracy"] for r in tested]
    flops = FlopsRegression.fit(fit_candidates, fit_accuracy, trainer.classes)
    return PredictorBuild(predictor, fitted, tested, quality(predictor.predict(test_candidates)[0], truth),
                          quality(flops.predict(test_candidates), truth))
