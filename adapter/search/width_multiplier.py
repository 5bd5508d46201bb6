"""The width-multiplier search: the baseline a user would compare NetAdapt against.

It finds the largest width multiplier α (on a grid of `--alpha-step` below the base model's)
whose LUT-estimated latency meets the budget (or, with `--select-by measured`, whose
whole-model latency measured on the device meets the measured budget), trains that model
from scratch with the base model's recipe, exports and measures it, and writes
`OUT/baseline/` (baseline.keras, baseline.tflite, baseline.json). `python -m adapter.baseline`
runs it alone; `adapter.adapt --baseline` puts it next to the NetAdapt result in its report. Epochs: by default as many as the NetAdapt
model in OUT saw in all (base training + the short-term steps of its chosen proposals +
long-term fine-tuning), else the base model's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError
from adapter.export import Deployment, measure_models, tflite_accuracy
from adapter.latency import Estimator, ensure_estimable, estimate_ms, model_specs
from adapter.search.netadapt import read_history, read_state
from adapter.train import TrainingRecord, evaluate, evaluate_split, fit, record_path
from adapter.training.data import Dataset
from lut.cli import number, positive_int
from lut.models import MODELS, build_model
from profiler.devices import Device
from profiler.monitor import MonitorPolicy, monitor_policy

__all__ = [
    "BASELINE_DIR",
    "BaselineResult",
    "ModelRecipe",
    "add_width_multiplier_arguments",
    "alpha_for_budget",
    "alpha_grid",
    "baseline_fields",
    "matched_epochs",
    "recipe_of",
    "run_baseline",
]

BASELINE_DIR = "baseline"


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """How the base model was built and trained (its `adapter.train` record, or its name)."""

    model: str
    alpha: float
    resolution: int
    classes: int
    epochs: int
    batch_size: int = 128
    lr: float = 2e-3
    optimizer: str = "adam"
    augment: bool = True


def recipe_of(model: Any, model_path: str | Path) -> ModelRecipe:
    """The recipe in the `.json` record `adapter.train` wrote next to `model_path`, or what
    `model.name` (`mobilenet_v1_0.5_32`, as `lut.models` names models) tells."""
    path = record_path(model_path)
    if path.is_file():
        r = TrainingRecord.load(path)
        return ModelRecipe(r.model, r.alpha, r.resolution, r.classes, r.epochs, r.batch_size, r.lr, r.optimizer, r.augment)
    for name in MODELS:
        prefix = f"{name}_"
        if model.name.startswith(prefix):
            try:
                alpha, resolution = model.name[len(prefix):].split("_")
                return ModelRecipe(name, float(alpha), int(resolution), int(model.output_shape[-1]), epochs=8)
            except ValueError:
                break
    raise AdapterError(
        f"Cannot tell the architecture and width of {model_path}: no training record {path} and the model's name "
        f"{model.name!r} is not one lut.models gives. Pass --arch and --alpha."
    )


MAX_ALPHAS = 1000  # widths one search may try: a finer grid is a typo, not a plan


def alpha_grid(base_alpha: float, alpha_step: float) -> list[float]:
    """The widths below `base_alpha` on the `alpha_step` grid, largest first: base − k·step > 0, k ≥ 1.

    Finite by construction: the step must be a positive finite number below `base_alpha`,
    giving at most `MAX_ALPHAS` widths.
    """
    if not (isinstance(alpha_step, (int, float)) and math.isfinite(alpha_step) and 0 < alpha_step < base_alpha):
        raise AdapterError(
            f"--alpha-step must be a positive number below the base model's α={base_alpha:g}. "
            f"Received: alpha_step={alpha_step!r}."
        )
    count = math.ceil(round(base_alpha / alpha_step, 6)) - 1
    if count > MAX_ALPHAS:
        raise AdapterError(
            f"--alpha-step {alpha_step:g} gives {count} widths below α={base_alpha:g}; expected at most {MAX_ALPHAS}. "
            f"Use --alpha-step {base_alpha / (MAX_ALPHAS + 1):.2g} or more."
        )
    alphas = (round(base_alpha - k * alpha_step, 6) for k in range(1, count + 1))
    return list(dict.fromkeys(a for a in alphas if a > 0))


def alpha_for_budget(
    recipe: ModelRecipe,
    estimator: Estimator,
    budget_ms: float,
    *,
    alpha_step: float = 0.025,
    device: Device | None = None,
    log: Callable[[str], None] = print,
    policy: MonitorPolicy | None = MonitorPolicy(),
) -> tuple[float, float]:
    """The largest α = recipe.alpha − k·alpha_step (k ≥ 1) whose LUT estimate is ≤ `budget_ms`,
    and that estimate. LUT entries α needs and lacks are measured on `device` (under the
    conditions monitor's `policy`, as `ensure_estimable` takes it)."""
    for alpha in alpha_grid(recipe.alpha, alpha_step):
        model = build_model(recipe.model, alpha=alpha, resolution=recipe.resolution, classes=recipe.classes)
        ensure_estimable(estimator, model_specs(estimator, model), device, log=log, policy=policy)
        estimated = estimate_ms(estimator, model)
        log(f"α = {alpha:g}: estimated {estimated:.4g} ms (budget {budget_ms:.4g} ms)")
        if estimated <= budget_ms:
            return alpha, estimated
    raise AdapterError(
        f"No width multiplier of {recipe.model} down to {alpha_step:g} meets the budget {budget_ms:.4g} ms."
    )


def _alpha_by_measurement(
    recipe: ModelRecipe, device: Device, budget_ms: float, alpha_step: float, log: Callable[[str], None],
    deployment: Deployment,
) -> tuple[float, float]:
    """The largest α on the grid whose whole model, measured on `device` as deployed, is ≤ `budget_ms`."""
    for alpha in alpha_grid(recipe.alpha, alpha_step):
        model = build_model(recipe.model, alpha=alpha, resolution=recipe.resolution, classes=recipe.classes)
        measured = measure_models(device, {"alpha": deployment.convert(model)})["alpha"]
        if measured.median_ms is None:
            raise AdapterError(f"Could not measure α = {alpha:g} on {device.name}: {measured.error}")
        log(f"α = {alpha:g}: measured {measured.median_ms:.4g} ms (budget {budget_ms:.4g} ms)")
        if measured.median_ms <= budget_ms:
            return alpha, measured.median_ms
    raise AdapterError(
        f"No width multiplier of {recipe.model} down to {alpha_step:g} meets {budget_ms:.4g} ms on {device.name}."
    )


def matched_epochs(recipe: ModelRecipe, adapt_dir: str | Path, train_images: int) -> int | None:
    """Epochs equal to the training the NetAdapt model in `adapt_dir` saw: base epochs,
    plus its chosen proposals' short-term steps, plus long-term epochs; None without a run."""
    state, history = read_state(adapt_dir), read_history(adapt_dir)
    if state is None or not history:
        return None
    config = state["config"]
    short_term_images = (len(history) - 1) * config["short_term_steps"] * config["batch_size"]
    return recipe.epochs + config["long_term_epochs"] + math.ceil(short_term_images / train_images)


@dataclasses.dataclass(frozen=True)
class BaselineResult:
    """The trained width-multiplier model and its figures (saved as baseline.json)."""

    model: str
    alpha: float
    select_by: str
    epochs: int
    estimated_ms: float
    measured_ms: float | None
    holdout_accuracy: float
    test_accuracy: float
    tflite_test_accuracy: float | None
    channels: dict[str, int]
    parameters: int
    seconds: float

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BaselineResult:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise AdapterError(f"{path} is not a baseline record written by adapter.baseline ({e}).") from e


def run_baseline(
    recipe: ModelRecipe,
    data: Dataset,
    estimator: Estimator,
    budget_ms: float,
    out_dir: str | Path,
    *,
    epochs: int,
    device: Device | None = None,
    select_by: str = "estimate",
    measured_budget_ms: float | None = None,
    alpha_step: float = 0.025,
    holdout_size: int = 2000,
    seed: int = 0,
    log: Callable[[str], None] = print,
    policy: MonitorPolicy | None = MonitorPolicy(),
    deployment: Deployment = Deployment(),
) -> BaselineResult:
    """Choose α, train it `epochs` epochs, export, measure on `device`; saves to `out_dir`/baseline.

    Args:
        recipe: how the base model was built and trained (`recipe_of`).
        data: the training, holdout and test splits.
        estimator: the LUT estimator the budget is in the terms of.
        budget_ms: the budget in the LUT's terms.
        out_dir: the run folder; the baseline goes to its `baseline/`.
        epochs: epochs to train the chosen width from scratch.
        device: measures missing LUT entries and the trained model (None: nothing is measured).
        select_by: "estimate" (by the LUT, as NetAdapt is) or "measured" (whole models on `device`).
        measured_budget_ms: the budget in measured ms ("measured" needs it).
        alpha_step: the grid of widths below the base model's.
        holdout_size: holdout images the accuracy is reported on.
        seed: seed of the initialisation and the training.
        log: where progress lines go.
        policy: the conditions monitor's policy for on-demand LUT entries (None: no monitor).
        deployment: how the baseline is converted to be measured and exported (as the LUT's ops).
    """
    # Keras and the pruning engine load TensorFlow: imported on use, so the CLI's --help answers at once.
    import keras

    from adapter.pruning.surgery import channel_counts

    if select_by not in ("estimate", "measured"):
        raise AdapterError(f"select_by must be 'estimate' or 'measured'; received {select_by!r}.")
    if select_by == "measured" and (device is None or measured_budget_ms is None):
        raise AdapterError("Choosing α by measurement needs a reachable device and the measured budget.")
    start = time.perf_counter()
    if select_by == "estimate":
        alpha, _ = alpha_for_budget(recipe, estimator, budget_ms, alpha_step=alpha_step, device=device, log=log,
                                    policy=policy)
    else:
        assert device is not None and measured_budget_ms is not None  # checked above
        alpha, _ = _alpha_by_measurement(recipe, device, measured_budget_ms, alpha_step, log, deployment)
    keras.utils.set_random_seed(seed)
    model = build_model(recipe.model, alpha=alpha, resolution=recipe.resolution, classes=recipe.classes)
    estimated = estimate_ms(estimator, model)
    log(f"training the baseline {model.name} from scratch for {epochs} epochs")
    fit(model, data.train, epochs=epochs, batch_size=recipe.batch_size, lr=recipe.lr, optimizer=recipe.optimizer,
        seed=seed, augment=recipe.augment, verbose=True)
    out = Path(out_dir) / BASELINE_DIR
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "baseline.keras")
    tflite = deployment.export(model, out / "baseline.tflite")
    measured = measure_models(device, {"baseline": tflite})["baseline"].median_ms if device is not None else None
    x_test, y_test = data.test.arrays()
    result = BaselineResult(
        model=recipe.model, alpha=alpha, select_by=select_by, epochs=epochs, estimated_ms=estimated,
        measured_ms=measured,
        holdout_accuracy=evaluate_split(model, data.holdout.take(min(holdout_size, len(data.holdout)))),
        test_accuracy=evaluate(model, x_test, y_test), tflite_test_accuracy=tflite_accuracy(tflite, x_test, y_test),
        channels=channel_counts(model), parameters=int(model.count_params()),
        seconds=round(time.perf_counter() - start, 1),
    )
    result.save(out / "baseline.json")
    return result


# --------------------------------------------------------------------------- the commands' side


def add_width_multiplier_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `adapter.baseline` and `adapter.adapt --baseline` share."""
    add = parser.add_argument
    add("--alpha-step", type=number(float, 0, 1, open_high=True), default=0.025,
        help="grid of width multipliers tried below the base model's (default: %(default)s)")
    add("--select-by", choices=("estimate", "measured"), default="estimate",
        help="pick α by the LUT estimate (as NetAdapt is) or by measuring whole models on the device "
             "(default: %(default)s)")
    add("--baseline-epochs", type=positive_int,
        help="epochs to train the baseline (default: as many as the NetAdapt model saw)")


def baseline_fields(
    args: argparse.Namespace,
    session: Any,
    budget_ms: float,
    measured_budget_ms: float | None,
    out: Path,
    *,
    train: bool = True,
) -> dict[str, Any] | None:
    """The baseline's figures for the report: trained now (`train`), or read from `out` when it
    was trained before (on --resume, or by `adapter.baseline`); None when there is none."""
    saved = out / BASELINE_DIR / "baseline.json"
    if not train or (getattr(args, "resume", False) and saved.is_file()):
        return dataclasses.asdict(BaselineResult.load(saved)) if saved.is_file() else None
    recipe = recipe_of(session.model, args.model)
    epochs = args.baseline_epochs
    if epochs is None:
        epochs = matched_epochs(recipe, out, len(session.data.train)) or recipe.epochs
    result = run_baseline(
        recipe, session.data, session.estimator, budget_ms, out, epochs=epochs, device=session.check_device,
        select_by=args.select_by, measured_budget_ms=measured_budget_ms, alpha_step=args.alpha_step,
        holdout_size=args.holdout, seed=args.seed, policy=monitor_policy(args), deployment=session.deployment,
    )
    return dataclasses.asdict(result)
