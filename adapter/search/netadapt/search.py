"""NetAdapt's loop: iterations to the budget, the check on the device, recalibration, walking back.

See `adapter.search.netadapt` for the method.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError
from adapter.latency import (
    MAX_RECALIBRATIONS,
    OVER_BUDGET_TOLERANCE,
    OVER_PRUNED,
    Estimator,
    GroupLatency,
    ensure_estimable,
    estimate_ms,
    model_specs,
)
from adapter.search.netadapt.config import NetAdaptConfig
from adapter.search.netadapt.history import (
    IterationRecord,
    _check_resumable,
    _load_iteration,
    _save_model,
    _saved_state,
    commit_iteration,
    iteration_model_path,
    read_history,
    save_state,
)
from adapter.search.netadapt.proposals import (
    EPSILON_MS,
    Proposal,
    ProposalResult,
    _assign_weights,
    _candidate_specs,
    _kept_channels,
    _proposal_trainer,
    _proposals,
    _select,
)
from adapter.search.netadapt.run import (
    NetAdaptResult,
    NetAdaptRun,
    _describe,
    _iteration_batches,
    _lut_step,
    _state,
)
from adapter.train import evaluate, fit
from adapter.training.data import Dataset
from profiler.cluster import ClusterConfig
from profiler.devices import Device
from profiler.monitor import MonitorPolicy

__all__ = [
    "NetAdaptResult",
    "NetAdaptRun",
    "SearchStopped",
    "long_term_finetune",
    "prepare_run",
    "run_iteration",
    "run_netadapt",
]

MAX_WALK_BACK = 6


def _propose(run: NetAdaptRun, model, groups, target_ms: float) -> tuple[GroupLatency, list[Proposal]]:
    latency = GroupLatency(model, groups, run.estimator)
    ensure_estimable(run.estimator, _candidate_specs(latency, run.step), run.device, log=run.log, policy=run.policy)
    return latency, _proposals(latency, run.step, target_ms)


def run_iteration(run: NetAdaptRun, iteration: int, model, previous: IterationRecord):
    """Propose, fine-tune and evaluate every proposal; returns the record, the proposal rows
    and the chosen model (a pruned Keras model with the fine-tuned weights)."""
    # imports Keras (TensorFlow): on use, so --help and bad input answer at once
    from adapter.pruning.graph import analyze
    from adapter.pruning.surgery import prune

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
    batches = _iteration_batches(run, iteration)
    groups = {g.id: g for g in graph.groups}
    start = time.perf_counter()
    keeps = [{p.group: _kept_channels(model, groups[p.group], p.count)} for p in proposals]
    times["surgery_s"] += time.perf_counter() - start
    assert run.trainer is not None  # set by prepare_run
    trained = run.trainer.train_all(iteration, model, keeps, batches, times)
    return [ProposalResult(p, accuracy, loss, keep, tuned, keras_model)
            for p, keep, (accuracy, loss, tuned, keras_model) in zip(proposals, keeps, trained, strict=True)]


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
    ensure_estimable(run.estimator, model_specs(run.estimator, model, smallest), run.device, log=run.log, policy=run.policy)
    floor = estimate_ms(run.estimator, model, smallest)
    if floor > budget + EPSILON_MS:
        raise AdapterError(
            f"The budget {budget:.4g} ms cannot be met: even with every prunable group at {run.step} channels the "
            f"estimate is {floor:.4g} ms (the original is {original:.4g} ms). Use a larger budget."
        )


def _start(run: NetAdaptRun, model, groups, out: Path, lut_path: str) -> IterationRecord:
    """Iteration 0: the original model, its estimate and holdout accuracy."""
    save_state(out, _state(run, lut_path))
    start = time.perf_counter()
    accuracy = evaluate(model, run.x_holdout, run.y_holdout)
    record = IterationRecord(
        0, "", 0, {g.id: g.size for g in groups}, run.original_ms, run.original_ms, accuracy, 0,
        time.perf_counter() - start,
    )
    _save_model(model, iteration_model_path(out, 0))
    commit_iteration(out, record, [])
    return record


def prepare_run(model: Any, data: Dataset, estimator: Estimator, config: NetAdaptConfig, out_dir: str | os.PathLike[str],
                *, device: Device | None = None,
                measured_original_ms: float | None = None, log: Callable[[str], None] = print,
                policy: MonitorPolicy | None = MonitorPolicy(), cluster: ClusterConfig | None = None) -> NetAdaptRun:
    """Everything the iterations of one run share: the holdout images, the original estimate
    and the budget (`Budget.lut_ms`; checked to be reachable), the grid step and the
    proposal trainer (in this process, or on the Ray workers of `cluster`, Ray started)."""
    # imports Keras (TensorFlow): on use, so --help and bad input answer at once
    from adapter.pruning.graph import find_groups

    if len(data.holdout) < config.holdout_size:
        raise AdapterError(
            f"holdout_size {config.holdout_size} needs as many holdout images; the data has {len(data.holdout)}."
        )
    x_holdout, y_holdout = data.holdout.take(config.holdout_size).arrays()
    ensure_estimable(estimator, model_specs(estimator, model), device, log=log, policy=policy)
    original = estimate_ms(estimator, model)
    budget = config.budget.lut_ms(original, measured_original_ms)
    run = NetAdaptRun(config, estimator, device, data, x_holdout, y_holdout, original, budget, measured_original_ms,
                      config.step or _lut_step(estimator.table), None, Path(out_dir), log, policy=policy)
    _check_reachable(run, model, find_groups(model))
    if cluster is None:
        run.trainer = _proposal_trainer(model, config, log)
    else:
        from adapter.search.netadapt.parallel import RayProposals  # loads Ray: only for a cluster

        run.trainer = RayProposals(config, cluster, log)
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
    measure: Callable[[Any], float | None] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    policy: MonitorPolicy | None = MonitorPolicy(),
    cluster: ClusterConfig | None = None,
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
    `cluster` (Ray started by the caller, `profiler.cluster.open_cluster`) fine-tunes each
    iteration's proposals in parallel on its workers, with the serial run's results.
    """
    out = Path(out_dir)
    history = read_history(out)
    if history and not resume:
        raise AdapterError(
            f"{out} already holds a NetAdapt run ({len(history) - 1} iterations); pass --resume to continue it "
            "or choose another --out."
        )
    # imports Keras (TensorFlow): on use, so --help and bad input answer at once
    from adapter.pruning.graph import find_groups

    if history:
        measured_original_ms = _saved_state(out).get("measured_original_ms")
    run = prepare_run(model, data, estimator, config, out, device=device, measured_original_ms=measured_original_ms,
                      log=log, policy=policy, cluster=cluster)
    if history:
        saved = _check_resumable(out, _state(run, estimator.table.path))
        run.original_ms, run.budget_ms = saved["original_ms"], saved["budget_ms"]
        run.recalibrations = saved.get("recalibrations", [])
        model = _load_iteration(out, history[-1].iteration)
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
        save_state(out, _state(run, estimator.table.path))
    handed_back = None
    if measure is not None:
        model, handed_back = _least_pruned_within(run, history, model, measured_fraction, measure)
    return NetAdaptResult(model, tuple(history), run.original_ms, run.budget_ms, run.measured_original_ms, run.step,
                          tuple(run.recalibrations), handed_back)


def _iterate_to_budget(run: NetAdaptRun, model, history: list[IterationRecord]):
    """Run iterations, saving each and appending it to `history`, until the estimate meets
    the budget; returns the last chosen model."""
    out = run.out_dir
    while history[-1].estimated_ms > run.budget_ms + EPSILON_MS:
        iteration = history[-1].iteration + 1
        record, rows, model = run_iteration(run, iteration, model, history[-1])
        _save_model(model, iteration_model_path(out, iteration))
        commit_iteration(out, record, rows)
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
                         measure: Callable[[Any], float | None]):
    """The model to hand back: the search's, unless it measures far under the budget
    (over-pruned, `OVER_PRUNED` below it); then the least-pruned saved iteration that still
    meets it, walking back (at most `MAX_WALK_BACK` measurements). Returns (model, record
    of the walk or None)."""
    target = run.config.budget.fraction(run.measured_original_ms)
    if measured_fraction is None or target is None or measured_fraction >= target * (1 - OVER_PRUNED):
        return model, None
    limit = target * (1 + OVER_BUDGET_TOLERANCE)
    walk: dict[str, Any] = {"from_iteration": history[-1].iteration, "from_fraction": measured_fraction, "checked": []}
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
    handed = (f"handing back iteration {chosen_iteration}'s model" if chosen_iteration != history[-1].iteration else
              "keeping it: no earlier iteration measured within the budget")
    run.log(f"iteration {history[-1].iteration}'s model measures {measured_fraction:.1%} of the original, far under the "
            f"budget {target:.1%} (over-pruned); {handed}")
    return chosen, walk


def long_term_finetune(model: Any, data: Dataset, config: NetAdaptConfig, *, verbose: bool = True) -> Any:
    """Train the adapted model `config.long_term_epochs` epochs (augmented, cosine learning rate);
    returns `adapter.train.FitResult`, or None for 0 epochs."""
    if config.long_term_epochs == 0:
        return None
    return fit(
        model, data.train, epochs=config.long_term_epochs, batch_size=config.batch_size,
        lr=config.long_term_lr, optimizer=config.optimizer, seed=config.seed, augment=True, verbose=verbose,
    )
