"""NetAdapt (Yang et al., ECCV 2018): prune filters until a LUT says the latency budget is met.

Each iteration lowers the latency target, target = current − Δ·decay^(i−1) (never below
the budget), and makes one proposal per prunable channel group: the largest channel count
on the step grid whose LUT-estimated model latency meets the target (groups that cannot
reach it are skipped), keeping the filters of largest L2 norm (summed over a tied group).
Every proposal is short-term fine-tuned and scored on a holdout split carved out of the
training data; the best one (highest holdout accuracy, or least accuracy lost per
millisecond saved) becomes the next iteration's model. The loop ends when the estimate
meets the budget; `long_term_finetune` then trains the result for a few epochs.

The LUT's estimate of a whole model is off by a few percent, and not by the same amount on
every model. A relative budget is therefore a ratio in the LUT's terms too (`Budget.lut_ms`:
that fraction of the original's estimate; an absolute one is scaled by the original's
estimate over its measurement). With a device, when the estimate meets the budget the
search measures its model interleaved with the original (`measure`: the measured
fraction); over the budget (+`OVER_BUDGET_TOLERANCE`), the budget in the LUT's terms is
scaled by requested / measured and the search goes on (at most `MAX_RECALIBRATIONS`
times); far under it (`OVER_PRUNED`), the search pruned more than asked, and the
least-pruned saved iteration that still meets the budget is handed back instead.

Per iteration, `out_dir` gets `iter_NNN.keras` (the chosen model), a row of
`history.csv` and the rows of `proposals.csv`; `run_netadapt(..., resume=True)` carries
on after the last completed iteration. Iteration 0 is the original model.

Cost: estimating a proposal needs no model. The specs of the current model are found
once per iteration, and for each group the specs its channel count changes (their channel
fields are affine in the count), so a candidate count costs a few LUT look-ups.
Proposals are fine-tuned by `adapter.flex.FlexTrainer` on physically sliced weights
(`adapter.surgery.pruned_weights`), with one traced training step for the whole run;
only the chosen proposal is rebuilt as a Keras model (`adapter.surgery.prune`). Models
with layers `FlexTrainer` does not know are pruned and trained with Keras for every
proposal (slower, same result).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from adapter.data import Dataset, Split
from adapter.errors import AdapterError
from adapter.latency import (
    MAX_RECALIBRATIONS,
    OVER_BUDGET_TOLERANCE,
    OVER_PRUNED,
    Budget,
    GroupLatency,
    ensure_estimable,
    estimate_ms,
)
from lut.keras_specs import specs_of_keras
from profiler.monitor import MonitorPolicy

__all__ = [
    "HOLDOUT_SIZE",
    "MAX_RECALIBRATIONS",
    "SELECTION_RULES",
    "SearchStopped",
    "Budget",
    "IterationRecord",
    "NetAdaptConfig",
    "NetAdaptResult",
    "NetAdaptRun",
    "Proposal",
    "ProposalResult",
    "ensure_estimable",
    "estimate_ms",
    "iteration_model_path",
    "long_term_finetune",
    "prepare_run",
    "read_history",
    "run_iteration",
    "run_netadapt",
]

SELECTION_RULES = ("accuracy", "accuracy_per_latency")
HISTORY_FILE, PROPOSALS_FILE, STATE_FILE = "history.csv", "proposals.csv", "netadapt.json"
_HISTORY_FIELDS = (
    "iteration", "group", "count", "channels", "estimated_ms", "target_ms", "holdout_accuracy",
    "proposals", "seconds", "estimate_s", "surgery_s", "finetune_s", "evaluate_s",
)
_PROPOSAL_FIELDS = ("iteration", "group", "count", "estimated_ms", "holdout_accuracy", "train_loss", "chosen")
_EPSILON_MS = 1e-9
HOLDOUT_SIZE = 2000  # training images kept out to rank proposals (the default of every search command)
MAX_WALK_BACK = 6


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class NetAdaptConfig:
    """How NetAdapt searches (schedule, proposals, fine-tuning, selection).

    The schedule removes `initial_reduction` of the original estimate in iteration 1 and
    `decay` times less in each next one, so it can remove at most
    `initial_reduction / (1 − decay)` of it in all: the paper's 0.025 and 0.96 saturate at
    62.5%, and a budget near that takes hundreds of iterations. The default decay 0.98
    reaches 50% of the original in about 26 iterations (budgets down to 25% stay within
    ~70); `run_netadapt` refuses a budget the schedule cannot reach.
    `step` None takes the LUT's channel grid step (its `step` meta, else 8).
    """

    budget: Budget
    initial_reduction: float = 0.025
    decay: float = 0.98
    step: int | None = None
    short_term_steps: int = 50
    batch_size: int = 128
    short_term_lr: float = 5e-4
    holdout_size: int = HOLDOUT_SIZE
    selection: str = "accuracy"
    long_term_epochs: int = 4
    long_term_lr: float = 1e-3
    optimizer: str = "adam"
    recalibration_images: int = 1024
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.budget, Budget):
            raise AdapterError(f"budget must be a Budget (e.g. Budget.parse('0.5')); received {self.budget!r}.")
        if not 0 < self.initial_reduction < 1:
            raise AdapterError(f"initial_reduction must be in (0, 1); received {self.initial_reduction!r}.")
        if not 0 < self.decay <= 1:
            raise AdapterError(f"decay must be in (0, 1]; received {self.decay!r}.")
        for name in ("short_term_steps", "batch_size", "holdout_size", "recalibration_images"):
            _require_positive_int(name, getattr(self, name))
        _require_positive_int("long_term_epochs", self.long_term_epochs, allow_zero=True)
        if self.step is not None:
            _require_positive_int("step", self.step)
        for name in ("short_term_lr", "long_term_lr"):
            if not getattr(self, name) > 0:
                raise AdapterError(f"{name} must be a positive number; received {getattr(self, name)!r}.")
        if self.selection not in SELECTION_RULES:
            raise AdapterError(f"Unknown selection rule {self.selection!r}: expected one of {list(SELECTION_RULES)}.")
        if self.optimizer not in ("adam", "sgd"):
            raise AdapterError(f"Unknown optimizer {self.optimizer!r}: expected 'adam' or 'sgd'.")

    def reduction_ms(self, iteration: int, original_ms: float) -> float:
        """The latency iteration `iteration` (from 1) must remove: Δ·decay^(i−1)."""
        return self.initial_reduction * original_ms * self.decay ** (iteration - 1)

    def max_reduction(self) -> float:
        """The fraction of the original latency the whole schedule can remove."""
        return math.inf if self.decay == 1 else self.initial_reduction / (1 - self.decay)

    def iterations_needed(self, fraction: float) -> int:
        """Iterations the schedule takes to remove `fraction` of the original (if each meets its target)."""
        if fraction <= 0:
            return 0
        if self.decay == 1:
            return math.ceil(fraction / self.initial_reduction)
        return math.ceil(math.log(1 - fraction * (1 - self.decay) / self.initial_reduction) / math.log(self.decay))

    def to_json(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["budget"] = dataclasses.asdict(self.budget)
        return fields


def _require_positive_int(name: str, value, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        kind = "an integer ≥ 0" if allow_zero else "a positive integer"
        raise AdapterError(f"{name} must be {kind}; received {name}={value!r}.")


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
            if estimated <= target_ms + _EPSILON_MS:
                proposals.append(Proposal(group_id, count, estimated))
                break
    return proposals


def _candidate_specs(latency: GroupLatency, step: int) -> list:
    specs = list(latency.base)
    for group_id in latency.groups:
        for count in latency.candidates(group_id, step):
            specs.extend(latency.specs_at(group_id, count))
    return specs


# --------------------------------------------------------------------------- proposals


def _kept_channels(model, group, count: int) -> np.ndarray:
    """The `count` channels of largest L2 norm (summed over a tied group's producers), sorted."""
    from adapter.surgery import filter_norms

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
    model: object = dataclasses.field(default=None, repr=False)  # the Keras model, where one was built


@dataclasses.dataclass(frozen=True, eq=False)
class _Batches:
    """One iteration's training images (the same for every proposal) and the holdout."""

    x: np.ndarray
    y: np.ndarray
    sample: Split
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    seed: int


class _FlexProposals:
    """Proposals as sliced weights, fine-tuned by one `FlexTrainer` for the whole run."""

    def __init__(self, model, config: NetAdaptConfig):
        from adapter.flex import FlexTrainer

        self.config, self.trainer = config, FlexTrainer(model, optimizer=config.optimizer)

    def train(self, model, graph, weights, keep, batches: _Batches, times: dict) -> tuple:
        from adapter.surgery import pruned_weights

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


class _KerasProposals:
    """Proposals as Keras models: `prune` then `adapter.train.fit` (one graph trace each)."""

    def __init__(self, model, config: NetAdaptConfig):
        self.config = config

    def train(self, model, graph, weights, keep, batches: _Batches, times: dict) -> tuple:
        from adapter.surgery import prune
        from adapter.train import evaluate, fit, recalibrate_batchnorm

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
    from adapter.flex import unsupported_layers

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
        saved = max(latency_before - result.proposal.estimated_ms, _EPSILON_MS)
        return ((result.holdout_accuracy - accuracy_before) / saved, result.holdout_accuracy)

    return max(results, key=score)


# --------------------------------------------------------------------------- history


@dataclasses.dataclass(frozen=True)
class IterationRecord:
    """One row of history.csv: the model chosen in `iteration` (0: the original)."""

    iteration: int
    group: str
    count: int
    channels: Mapping[str, int]
    estimated_ms: float
    target_ms: float
    holdout_accuracy: float
    proposals: int
    seconds: float
    estimate_s: float = 0.0
    surgery_s: float = 0.0
    finetune_s: float = 0.0
    evaluate_s: float = 0.0

    def row(self) -> dict[str, str]:
        values = dataclasses.asdict(self)
        values["channels"] = json.dumps(dict(self.channels))
        return {k: (repr(v) if isinstance(v, float) else str(v)) for k, v in values.items()}

    @classmethod
    def from_row(cls, row: Mapping[str, str]) -> IterationRecord:
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for name in _HISTORY_FIELDS:
            text = row[name]
            values[name] = (
                json.loads(text) if name == "channels"
                else int(text) if types[name] == "int" else float(text) if types[name] == "float" else text
            )
        return cls(**values)


def read_history(out_dir: str | os.PathLike) -> list[IterationRecord]:
    """The completed iterations recorded in `out_dir`/history.csv (empty if there is none)."""
    path = Path(out_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            return [IterationRecord.from_row(row) for row in csv.DictReader(f)]
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterError(f"{path} is not a NetAdapt history ({e!r}); remove it or use another --out.") from e


def _append_csv(path: Path, fields: Sequence[str], rows: Sequence[Mapping[str, object]]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def _keep_proposal_rows(path: Path, last_iteration: int) -> None:
    """Drop proposals.csv rows of an iteration that was interrupted before its history row."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if int(row["iteration"]) <= last_iteration]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_PROPOSAL_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _save_model(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def iteration_model_path(out_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(out_dir) / f"iter_{iteration:03d}.keras"


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True, eq=False)
class NetAdaptResult:
    """The search's outcome: the last chosen model (not yet long-term fine-tuned)."""

    model: object
    history: tuple[IterationRecord, ...]
    original_ms: float
    budget_ms: float
    measured_original_ms: float | None
    step: int
    recalibrations: tuple[dict, ...] = ()
    handed_back: dict | None = None  # an over-pruned result walked back to an earlier iteration


@dataclasses.dataclass(eq=False)
class NetAdaptRun:
    """What every iteration of one run shares (made by `prepare_run`)."""

    config: NetAdaptConfig
    estimator: object
    device: object
    data: Dataset
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    original_ms: float
    budget_ms: float
    measured_original_ms: float | None
    step: int
    trainer: object
    out_dir: Path
    log: Callable[[str], None]
    recalibrations: list[dict] = dataclasses.field(default_factory=list)
    policy: MonitorPolicy | None = MonitorPolicy()  # the conditions monitor's policy for on-demand LUT entries


def _iteration_batches(run: NetAdaptRun, iteration: int) -> _Batches:
    """Training images for `iteration`: a reproducible random draw (seeded by run and iteration)."""
    config, train = run.config, run.data.train
    needed = config.short_term_steps * config.batch_size
    rng = np.random.default_rng([config.seed, iteration])
    rows = np.concatenate([rng.permutation(len(train)) for _ in range(-(-needed // len(train)))])[:needed]
    sample = dataclasses.replace(train, images=train.images[rows], labels=train.labels[rows], indices=train.indices[rows])
    x, y = sample.arrays()
    return _Batches(x, y, sample, run.x_holdout, run.y_holdout, config.seed * 10007 + iteration)


def _propose(run: NetAdaptRun, model, groups, target_ms: float) -> tuple[GroupLatency, list[Proposal]]:

    latency = GroupLatency(model, groups, run.estimator, specs_of_keras)
    ensure_estimable(run.estimator, _candidate_specs(latency, run.step), run.device, log=run.log, policy=run.policy)
    return latency, _proposals(latency, run.step, target_ms)


def run_iteration(run: NetAdaptRun, iteration: int, model, previous: IterationRecord):
    """Propose, fine-tune and evaluate every proposal; returns the record, the proposal rows
    and the chosen model (a pruned Keras model with the fine-tuned weights)."""
    from adapter.graph import analyze
    from adapter.surgery import prune

    begin = time.perf_counter()
    times = dict.fromkeys(("estimate_s", "surgery_s", "finetune_s", "evaluate_s"), 0.0)
    target = max(previous.estimated_ms - run.config.reduction_ms(iteration, run.original_ms), run.budget_ms)
    graph = analyze(model)
    _, proposals = _propose(run, model, graph.groups, target)
    times["estimate_s"] += time.perf_counter() - begin
    if not proposals:
        raise _stopped(run, iteration, target, previous)
    results = _train_proposals(run, iteration, model, graph, proposals, times)
    best = _select(results, run.config.selection, previous.holdout_accuracy, previous.estimated_ms)
    start = time.perf_counter()
    chosen = best.model
    if chosen is None:
        chosen = prune(model, best.keep)
        _assign_weights(chosen, best.weights)
    channels = {g.id: (best.proposal.count if g.id == best.proposal.group else g.size) for g in graph.groups}
    times["surgery_s"] += time.perf_counter() - start
    record = IterationRecord(
        iteration, best.proposal.group, best.proposal.count, channels, best.proposal.estimated_ms, target,
        best.holdout_accuracy, len(results), time.perf_counter() - begin, **times,
    )
    rows = [
        {"iteration": iteration, "group": r.proposal.group, "count": r.proposal.count,
         "estimated_ms": repr(r.proposal.estimated_ms), "holdout_accuracy": repr(r.holdout_accuracy),
         "train_loss": repr(r.train_loss), "chosen": int(r is best)}
        for r in results
    ]
    return record, rows, chosen


def _train_proposals(run: NetAdaptRun, iteration: int, model, graph, proposals, times: dict) -> list[ProposalResult]:
    """Fine-tune and score every proposal on the iteration's shared training images."""
    from adapter.flex import model_weights

    batches = _iteration_batches(run, iteration)
    weights = model_weights(model) if isinstance(run.trainer, _FlexProposals) else None
    groups = {g.id: g for g in graph.groups}
    results = []
    for proposal in proposals:
        start = time.perf_counter()
        keep = {proposal.group: _kept_channels(model, groups[proposal.group], proposal.count)}
        times["surgery_s"] += time.perf_counter() - start
        accuracy, loss, tuned, keras_model = run.trainer.train(model, graph, weights, keep, batches, times)
        results.append(ProposalResult(proposal, accuracy, loss, keep, tuned, keras_model))
    return results


class SearchStopped(AdapterError):
    """No channel group can be pruned to the iteration's target."""


def _stopped(run: NetAdaptRun, iteration: int, target: float, previous: IterationRecord) -> SearchStopped:
    return SearchStopped(
        f"NetAdapt stopped at iteration {iteration}: no channel group can be pruned to the target "
        f"{target:.4g} ms. It got to an estimated {previous.estimated_ms:.4g} ms "
        f"({previous.estimated_ms / run.original_ms:.1%} of the original {run.original_ms:.4g} ms); the budget is "
        f"{run.budget_ms:.4g} ms. The best model so far is {iteration_model_path(run.out_dir, iteration - 1)}; "
        "a smaller --initial-reduction or --step, or a larger budget, may help."
    )


def _lut_step(table) -> int:
    text = table.meta.get("step", "8")
    try:
        return int(text)
    except ValueError as e:
        raise AdapterError(f"The LUT {table.path} has a malformed step {text!r} in its meta; expected an integer.") from e


def _check_reachable(run: NetAdaptRun, model, groups) -> None:
    """Refuse budgets that the schedule, or the smallest model the grid allows, cannot reach."""

    config, original, budget = run.config, run.original_ms, run.budget_ms
    needed = 1 - budget / original
    if needed > config.max_reduction():
        raise AdapterError(
            f"The budget {budget:.4g} ms needs {needed:.1%} less than the original {original:.4g} ms, but the schedule "
            f"(initial reduction {config.initial_reduction:g}, decay {config.decay:g}) removes at most "
            f"{config.max_reduction():.1%}. Raise --initial-reduction or --decay (1.0 keeps every step equal)."
        )
    smallest = {name: min(run.step, g.size) for g in groups for name in g.producers}
    ensure_estimable(run.estimator, specs_of_keras(model, smallest), run.device, log=run.log, policy=run.policy)
    floor = estimate_ms(run.estimator, model, smallest)
    if floor > budget + _EPSILON_MS:
        raise AdapterError(
            f"The budget {budget:.4g} ms cannot be met: even with every prunable group at {run.step} channels the "
            f"estimate is {floor:.4g} ms (the original is {original:.4g} ms). Use a larger budget."
        )


def _state(run: NetAdaptRun, lut_path: str) -> dict:
    return {
        "config": run.config.to_json(), "original_ms": run.original_ms, "budget_ms": run.budget_ms,
        "measured_original_ms": run.measured_original_ms, "step": run.step, "lut": os.path.abspath(lut_path),
        "recalibrations": run.recalibrations,
    }


def _saved_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"Cannot resume in {out}: its {STATE_FILE} is missing or unreadable ({e}).") from e


def _check_resumable(out: Path, state: dict) -> dict:
    """The saved state of the run in `out`; its configuration must be the one given now."""
    saved = _saved_state(out)
    changed = {k: (saved["config"].get(k), v) for k, v in state["config"].items() if saved["config"].get(k) != v}
    if saved.get("step") != state["step"]:
        changed["step"] = (saved.get("step"), state["step"])
    if changed:
        described = ", ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed.items())
        raise AdapterError(f"Cannot resume in {out}: the run was started with other settings ({described}).")
    return saved


def _start(run: NetAdaptRun, model, groups, out: Path, lut_path: str) -> IterationRecord:
    """Iteration 0: the original model, its estimate and holdout accuracy."""
    from adapter.train import evaluate

    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_FILE).write_text(json.dumps(_state(run, lut_path), indent=2) + "\n")
    start = time.perf_counter()
    accuracy = evaluate(model, run.x_holdout, run.y_holdout)
    record = IterationRecord(
        0, "", 0, {g.id: g.size for g in groups}, run.original_ms, run.original_ms, accuracy, 0,
        time.perf_counter() - start,
    )
    _save_model(model, iteration_model_path(out, 0))
    _append_csv(out / HISTORY_FILE, _HISTORY_FIELDS, [record.row()])
    return record


def _describe(record: IterationRecord, run: NetAdaptRun) -> str:
    if record.iteration == 0:
        measured = "" if run.measured_original_ms is None else f" (measured {run.measured_original_ms:.4g} ms)"
        return (f"iteration 0: original model, estimated {record.estimated_ms:.4g} ms{measured}, budget "
                f"{run.budget_ms:.4g} ms by the LUT, holdout accuracy {record.holdout_accuracy:.4f}")
    return (
        f"iteration {record.iteration}: {record.group} → {record.count} channels, estimated "
        f"{record.estimated_ms:.4g} ms (target {record.target_ms:.4g}, budget {run.budget_ms:.4g}), holdout "
        f"{record.holdout_accuracy:.4f}, {record.proposals} proposals, {record.seconds:.1f} s "
        f"(fine-tune {record.finetune_s:.1f}, evaluate {record.evaluate_s:.1f}, surgery {record.surgery_s:.1f}, "
        f"LUT {record.estimate_s:.1f})"
    )


def prepare_run(model, data: Dataset, estimator, config: NetAdaptConfig, out_dir, *, device=None,
                measured_original_ms: float | None = None, log: Callable[[str], None] = print,
                policy: MonitorPolicy | None = MonitorPolicy()) -> NetAdaptRun:
    """Everything the iterations of one run share: the holdout images, the original estimate
    and the budget (`Budget.lut_ms`; checked to be reachable), the grid step and the
    proposal trainer."""
    from adapter.graph import find_groups

    if len(data.holdout) < config.holdout_size:
        raise AdapterError(
            f"holdout_size {config.holdout_size} needs as many holdout images; the data has {len(data.holdout)}."
        )
    x_holdout, y_holdout = data.holdout.take(config.holdout_size).arrays()
    ensure_estimable(estimator, specs_of_keras(model), device, log=log, policy=policy)
    original = estimate_ms(estimator, model)
    budget = config.budget.lut_ms(original, measured_original_ms)
    run = NetAdaptRun(config, estimator, device, data, x_holdout, y_holdout, original, budget, measured_original_ms,
                      config.step or _lut_step(estimator.table), None, Path(out_dir), log, policy=policy)
    _check_reachable(run, model, find_groups(model))
    run.trainer = _proposal_trainer(model, config, log)
    return run


def run_netadapt(
    model,
    data: Dataset,
    estimator,
    config: NetAdaptConfig,
    out_dir: str | os.PathLike,
    *,
    device=None,
    measured_original_ms: float | None = None,
    measure: Callable[[object], float | None] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    policy: MonitorPolicy | None = MonitorPolicy(),
) -> NetAdaptResult:
    """Prune `model` until `estimator`'s LUT says it meets `config.budget` (see the module doc).

    `data.holdout` must hold at least `config.holdout_size` images (its first ones are
    used). `device` (a `profiler.devices.Device` of the LUT's conditions, or None)
    measures the LUT entries the search needs and lacks. `measured_original_ms`, the
    original's latency measured on the LUT's device, calibrates an absolute budget
    (`Budget.lut_ms`); `measure` (a Keras model's latency as a fraction of the original's,
    measured interleaved on that device, or None when no verdict could be taken) checks
    the search's result (see the module doc). With `resume`, continues the run
    recorded in `out_dir` (with its budget); without it, `out_dir` must not hold one.
    """
    out = Path(out_dir)
    history = read_history(out)
    if history and not resume:
        raise AdapterError(
            f"{out} already holds a NetAdapt run ({len(history) - 1} iterations); pass --resume to continue it "
            "or choose another --out."
        )
    from adapter.graph import find_groups

    if history:
        measured_original_ms = _saved_state(out).get("measured_original_ms")
    run = prepare_run(model, data, estimator, config, out, device=device, measured_original_ms=measured_original_ms,
                      log=log, policy=policy)
    if history:
        saved = _check_resumable(out, _state(run, estimator.table.path))
        run.original_ms, run.budget_ms = saved["original_ms"], saved["budget_ms"]
        run.recalibrations = saved.get("recalibrations", [])
        model = _load_iteration(out, history[-1].iteration)
        _keep_proposal_rows(out / PROPOSALS_FILE, history[-1].iteration)
        log(f"resuming after iteration {history[-1].iteration} of the run in {out}")
    else:
        history = [_start(run, model, find_groups(model), out, estimator.table.path)]
        log(_describe(history[0], run))
    measured_fraction = None
    while True:
        try:
            model = _iterate_to_budget(run, model, history)
        except SearchStopped as e:
            if not run.recalibrations:
                raise
            log(f"{e} Keeping iteration {history[-1].iteration}'s model; the final check says how far off it is.")
            break
        if measure is None:
            break
        measured_fraction = measure(model)
        if not _recalibrated(run, history[-1], measured_fraction):
            break
        (out / STATE_FILE).write_text(json.dumps(_state(run, estimator.table.path), indent=2) + "\n")
    handed_back = None
    if measure is not None:
        model, handed_back = _least_pruned_within(run, history, model, measured_fraction, measure)
    return NetAdaptResult(model, tuple(history), run.original_ms, run.budget_ms, run.measured_original_ms, run.step,
                          tuple(run.recalibrations), handed_back)


def _iterate_to_budget(run: NetAdaptRun, model, history: list[IterationRecord]):
    """Run iterations, saving each and appending it to `history`, until the estimate meets
    the budget; returns the last chosen model."""
    out = run.out_dir
    while history[-1].estimated_ms > run.budget_ms + _EPSILON_MS:
        iteration = history[-1].iteration + 1
        record, rows, model = run_iteration(run, iteration, model, history[-1])
        _append_csv(out / PROPOSALS_FILE, _PROPOSAL_FIELDS, rows)
        _save_model(model, iteration_model_path(out, iteration))
        _append_csv(out / HISTORY_FILE, _HISTORY_FIELDS, [record.row()])
        history.append(record)
        run.log(_describe(record, run))
    return model


def _recalibrated(run: NetAdaptRun, last: IterationRecord, measured_fraction: float | None) -> bool:
    """Whether the search must go on: its model, estimated to meet the budget, measures
    over it (as a fraction of the original, measured interleaved with it). Then the budget
    in the LUT's terms is scaled by requested / measured fraction, and the search goes on."""
    target = run.config.budget.fraction(run.measured_original_ms)
    if measured_fraction is None or target is None:
        run.log(f"iteration {last.iteration}'s model could not be checked on the device; keeping it")
        return False
    limit = target * (1 + OVER_BUDGET_TOLERANCE)
    if measured_fraction <= limit:
        run.log(f"iteration {last.iteration}'s model measures {measured_fraction:.1%} of the original on the device: "
                f"within the budget {target:.1%} (+{OVER_BUDGET_TOLERANCE:.0%})")
        return False
    if len(run.recalibrations) >= MAX_RECALIBRATIONS:
        run.log(f"iteration {last.iteration}'s model measures {measured_fraction:.1%} of the original, over the budget "
                f"{target:.1%}, after {MAX_RECALIBRATIONS} recalibrations; stopping the search here")
        return False
    run.budget_ms *= target / measured_fraction
    run.recalibrations.append({"iteration": last.iteration, "estimated_ms": last.estimated_ms,
                               "measured_fraction": measured_fraction, "budget_ms": run.budget_ms})
    run.log(f"iteration {last.iteration}'s model measures {measured_fraction:.1%} of the original on the device, over "
            f"the budget {target:.1%}; going on to {run.budget_ms:.4g} ms in the LUT's terms")
    return True


def _least_pruned_within(run: NetAdaptRun, history: list[IterationRecord], model, measured_fraction: float | None,
                         measure: Callable[[object], float | None]):
    """The model to hand back: the search's, unless it measures far under the budget
    (over-pruned, `OVER_PRUNED` below it); then the least-pruned saved iteration that still
    meets it, walking back (at most `MAX_WALK_BACK` measurements). Returns (model, record
    of the walk or None)."""
    target = run.config.budget.fraction(run.measured_original_ms)
    if measured_fraction is None or target is None or measured_fraction >= target * (1 - OVER_PRUNED):
        return model, None
    limit = target * (1 + OVER_BUDGET_TOLERANCE)
    walk = {"from_iteration": history[-1].iteration, "from_fraction": measured_fraction, "checked": []}
    chosen, chosen_iteration = model, history[-1].iteration
    for record in list(reversed(history[:-1]))[:MAX_WALK_BACK]:
        if record.iteration == 0:
            break
        candidate = _load_iteration(run.out_dir, record.iteration)
        fraction = measure(candidate)
        walk["checked"].append({"iteration": record.iteration, "measured_fraction": fraction})
        if fraction is None or fraction > limit:
            break
        chosen, chosen_iteration = candidate, record.iteration
        if fraction >= target * (1 - OVER_PRUNED):
            break
    walk["to_iteration"] = chosen_iteration
    run.log(f"iteration {history[-1].iteration}'s model measures {measured_fraction:.1%} of the original, far under the "
            f"budget {target:.1%} (over-pruned); handing back iteration {chosen_iteration}'s model")
    return chosen, walk


def _load_iteration(out: Path, iteration: int):
    from lut.models import load_model

    path = iteration_model_path(out, iteration)
    if not path.is_file():
        raise AdapterError(f"Cannot resume in {out}: history.csv records iteration {iteration} but {path.name} is missing.")
    return load_model(path)


def long_term_finetune(model, data: Dataset, config: NetAdaptConfig, *, verbose: int = 2):
    """Train the adapted model `config.long_term_epochs` epochs (augmented, cosine learning rate);
    returns `adapter.train.FitResult`, or None for 0 epochs."""
    from adapter.train import fit

    if config.long_term_epochs == 0:
        return None
    return fit(
        model, data.train, epochs=config.long_term_epochs, batch_size=config.batch_size,
        lr=config.long_term_lr, optimizer=config.optimizer, seed=config.seed, augment=True, verbose=verbose,
    )
