"""One NetAdapt run: what its iterations share (`NetAdaptRun`), what it hands back (`NetAdaptResult`),
its saved state and how it describes an iteration."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adapter.errors import AdapterError
from adapter.latency import Estimator
from adapter.search.netadapt.config import NetAdaptConfig
from adapter.search.netadapt.history import IterationRecord
from adapter.search.netadapt.proposals import ProposalTrainer, _Batches
from adapter.training.data import Dataset
from profiler.devices import Device
from profiler.monitor import MonitorPolicy

__all__ = ["NetAdaptResult", "NetAdaptRun"]


@dataclasses.dataclass(frozen=True, eq=False)
class NetAdaptResult:
    """The search's outcome: the last chosen model (not yet long-term fine-tuned)."""

    model: Any  # a keras.Model
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
    estimator: Estimator
    device: Device | None
    data: Dataset
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    original_ms: float
    budget_ms: float
    measured_original_ms: float | None
    step: int
    trainer: ProposalTrainer | None
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


def _lut_step(table) -> int:
    text = table.meta.get("step", "8")
    try:
        return int(text)
    except ValueError as e:
        raise AdapterError(f"The LUT {table.path} has a malformed step {text!r} in its meta; expected an integer.") from e


def _state(run: NetAdaptRun, lut_path: str) -> dict:
    return {
        "config": run.config.to_json(), "original_ms": run.original_ms, "budget_ms": run.budget_ms,
        "measured_original_ms": run.measured_original_ms, "step": run.step, "lut": os.path.abspath(lut_path),
        "recalibrations": run.recalibrations,
    }


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
