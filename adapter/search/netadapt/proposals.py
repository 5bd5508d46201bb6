"""NetAdapt's proposals: per channel group, the largest count on the grid that meets the target,
the filters kept (largest L2 norm), and their short-term fine-tuning and scoring.

Proposals are fine-tuned by `adapter.training.flex.FlexTrainer` on physically sliced weights
(`adapter.pruning.surgery.pruned_weights`), with one traced training step for the whole run; only
the chosen proposal is rebuilt as a Keras model (`adapter.pruning.surgery.prune`). Models with
layers `FlexTrainer` does not know are pruned and trained with Keras for every proposal
(slower, same result).
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from adapter.latency import GroupLatency
from adapter.search.netadapt.config import NetAdaptConfig
from adapter.train import evaluate, fit, recalibrate_batchnorm
from adapter.training.data import Split

__all__ = ["EPSILON_MS", "Proposal", "ProposalResult", "ProposalTrainer"]

EPSILON_MS = 1e-9  # estimates equal up to float rounding meet a target



@dataclasses.dataclass(frozen=True)
class Proposal:
    """One group pruned to `count` channels, estimated at `estimated_ms`."""

    group: str
    count: int
    estimated_ms: float


def _proposals(latency: GroupLatency, step: int, target_ms: float) -> list[Proposal]:
    proposals = []
    for group_id in latency.groups:
        for count in latency.candidates(group_id, step):
            estimated = latency.total_ms_at(group_id, count)
            if estimated <= target_ms + EPSILON_MS:
                proposals.append(Proposal(group_id, count, estimated))
                break
    return proposals


def _candidate_specs(latency: GroupLatency, step: int) -> list:
    specs = list(latency.base)
    for group_id in latency.groups:
        for count in latency.candidates(group_id, step):
            specs.extend(latency.specs_at(group_id, count))
    return specs


def _kept_channels(model, group, count: int) -> np.ndarray:
    """The `count` channels of largest L2 norm (summed over a tied group's producers), sorted."""
    # imports Keras (TensorFlow): on use, so --help and bad input answer at once
    from adapter.pruning.surgery import filter_norms

    ranking = np.argsort(-filter_norms(model, group), kind="stable")
    return np.sort(ranking[:count])


def _assign_weights(model, weights) -> None:
    for layer in model.layers:
        for variable in layer.weights:
            variable.assign(weights[layer.name][variable.name])


@dataclasses.dataclass(frozen=True, eq=False)
class ProposalResult:
    """A fine-tuned proposal: its holdout accuracy and last training loss."""

    proposal: Proposal
    holdout_accuracy: float
    train_loss: float
    keep: Mapping[str, np.ndarray] = dataclasses.field(repr=False)
    weights: Mapping = dataclasses.field(repr=False)
    model: Any = dataclasses.field(default=None, repr=False)  # the Keras model, where one was built


@dataclasses.dataclass(frozen=True, eq=False)
class _Batches:
    """One iteration's training images (the same for every proposal) and the holdout."""

    x: np.ndarray
    y: np.ndarray
    sample: Split
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    seed: int


class ProposalTrainer(Protocol):
    """Fine-tunes and scores an iteration's proposals (one `keep` each): per proposal (holdout
    accuracy, last loss, trained weights or None, the pruned Keras model or None), in order."""

    def train_all(self, iteration: int, model: Any, keeps: Sequence[Mapping[str, np.ndarray]], batches: _Batches,
                  times: dict[str, float]) -> list[tuple[float, float, Any, Any]]: ...


class _InProcess(abc.ABC):
    """Proposals trained one after another in this process, by a subclass's `train`."""

    def train_all(self, iteration: int, model, keeps, batches: _Batches, times: dict) -> list[tuple]:
        # imports Keras (TensorFlow): on use, so --help and bad input answer at once
        from adapter.pruning.graph import analyze

        graph = analyze(model)
        weights = self.model_weights(model)
        return [self.train(model, graph, weights, keep, batches, times) for keep in keeps]

    def model_weights(self, model) -> Any:
        return None

    @abc.abstractmethod
    def train(self, model, graph, weights, keep, batches: _Batches, times: dict) -> tuple:
        """(holdout accuracy, last loss, trained weights or None, the pruned Keras model or None) of one proposal."""


class _FlexProposals(_InProcess):
    """Proposals as sliced weights, fine-tuned by one `FlexTrainer` for the whole run."""

    def __init__(self, model, config: NetAdaptConfig):
        # imports TensorFlow: on use, so --help and bad input answer at once
        from adapter.training.flex import FlexTrainer

        self.config, self.trainer = config, FlexTrainer(model, optimizer=config.optimizer)

    def model_weights(self, model) -> Any:
        # imports TensorFlow: on use, so --help and bad input answer at once
        from adapter.training.flex import model_weights

        return model_weights(model)

    def train(self, model, graph, weights, keep, batches: _Batches, times: dict) -> tuple:
        # imports Keras (TensorFlow): on use, so --help and bad input answer at once
        from adapter.pruning.surgery import pruned_weights

        start = time.perf_counter()
        self.trainer.load(pruned_weights(graph, weights, keep))
        times["surgery_s"] += time.perf_counter() - start
        start = time.perf_counter()
        loss = self.trainer.fit(
            batches.x, batches.y, batch_size=self.config.batch_size, lr=self.config.short_term_lr, seed=batches.seed
        )
        self.trainer.recalibrate(batches.x[: self.config.recalibration_images])
        times["finetune_s"] += time.perf_counter() - start
        start = time.perf_counter()
        accuracy = self.trainer.accuracy(batches.x_holdout, batches.y_holdout)
        times["evaluate_s"] += time.perf_counter() - start
        return accuracy, loss, self.trainer.weights(), None


class _KerasProposals(_InProcess):
    """Proposals as Keras models: `prune` then `adapter.train.fit` (one graph trace each)."""

    def __init__(self, model, config: NetAdaptConfig):
        self.config = config

    def train(self, model, graph, weights, keep, batches: _Batches, times: dict) -> tuple:
        # imports Keras (TensorFlow): on use, so --help and bad input answer at once
        from adapter.pruning.surgery import prune

        config, start = self.config, time.perf_counter()
        pruned = prune(model, keep)
        times["surgery_s"] += time.perf_counter() - start
        start = time.perf_counter()
        result = fit(
            pruned, batches.sample, steps=config.short_term_steps, batch_size=config.batch_size,
            lr=config.short_term_lr, optimizer=config.optimizer, seed=batches.seed, recalibrate=False,
        )
        recalibrate_batchnorm(pruned, batches.sample, images=config.recalibration_images)
        times["finetune_s"] += time.perf_counter() - start
        start = time.perf_counter()
        accuracy = evaluate(pruned, batches.x_holdout, batches.y_holdout)
        times["evaluate_s"] += time.perf_counter() - start
        return accuracy, result.loss, None, pruned


def _proposal_trainer(model, config: NetAdaptConfig, log: Callable[[str], None]):
    # imports TensorFlow: on use, so --help and bad input answer at once
    from adapter.training.flex import unsupported_layers

    unsupported = unsupported_layers(model)
    if not unsupported:
        return _FlexProposals(model, config)
    log(f"fine-tuning proposals with Keras (slower): FlexTrainer does not support {', '.join(unsupported[:3])}")
    return _KerasProposals(model, config)


def _select(results: Sequence[ProposalResult], rule: str, accuracy_before: float, latency_before: float):
    """The best proposal: highest holdout accuracy, or (MobileNetV3's rule) the highest
    Δaccuracy/Δlatency, i.e. the least accuracy lost per millisecond saved."""
    def score(result: ProposalResult) -> tuple:
        if rule == "accuracy":
            return (result.holdout_accuracy, -result.proposal.estimated_ms)
        saved = max(latency_before - result.proposal.estimated_ms, EPSILON_MS)
        return ((result.holdout_accuracy - accuracy_before) / saved, result.holdout_accuracy)

    return max(results, key=score)
