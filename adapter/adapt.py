"""Adapt a trained model to a latency budget on a device, from that device's LUT.

    python -m adapter.adapt --model runs/base.keras --lut luts/host-cpu-1t.sqlite \\
        --budget 0.5 --data fashion_mnist --out runs/adapt

runs NetAdapt (`adapter.netadapt`) until the LUT estimate meets the budget, fine-tunes the
result, and writes to --out: adapted.keras, adapted.tflite (float32; --int8 adds
adapted_int8.tflite), history.csv, proposals.csv, iter_NNN.keras, report.json, report.md
and accuracy_latency.png. The original is measured whole on the device (default: the
LUT's, when reachable) before the search, which calibrates the budget in the LUT's terms
(`Budget.lut_ms`); the exported model is measured after it, and the report says whether
the budget is met there, within a 3% measuring tolerance. `--baseline` also trains the width-multiplier model that meets
the same budget and puts it in the report. Running the same command again resumes an interrupted
run (a run in --out started with other settings is refused, naming them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from adapter.errors import AdapterError
from adapter.final_check import LUT_TOLERANCE
from lut.cli import (
    EXIT_NOT_MET,
    EXIT_OK,
    ArgumentParser,
    check_output_folder,
    non_negative_int,
    number,
    positive_float,
    positive_int,
    quiet_litert_notice,
    run_command,
)
from profiler.monitor import add_monitor_arguments, monitor_policy

__all__ = ["main", "run_cli"]


def _parser(baseline_only: bool) -> argparse.ArgumentParser:
    from adapter.baseline import add_baseline_arguments
    from adapter.netadapt import SELECTION_RULES, NetAdaptConfig

    d = NetAdaptConfig.__dataclass_fields__
    parser = ArgumentParser(
        prog="python -m adapter.baseline" if baseline_only else "python -m adapter.adapt",
        description=(sys.modules["adapter.baseline"].__doc__ if baseline_only else __doc__).split("\n\n")[0].strip(),
    )
    add = parser.add_argument
    add("--model", required=True, help="the trained base model (.keras, e.g. from python -m adapter.train)")
    add("--lut", required=True, help="the device's LUT (python -m profiler.build_lut)")
    add("--budget", required=True, help="latency budget: a fraction of the original's latency (0.5, or 50%%) or milliseconds (12ms); "
        "measured on the device when it is reachable (the LUT's terms are calibrated by the original's measurement), else estimated")
    add("--data", default="fashion_mnist", help="'fashion_mnist', an image folder or an .npz (as for adapter.train) (default: %(default)s)")
    add("--out", required=True, help="output folder")
    add("--device", help="device that measures missing LUT entries and the final model (default: the LUT's device, when reachable)")
    add("--devices", metavar="FILE", help="devices.toml registry for phones")
    add("--holdout", type=positive_int, default=d["holdout_size"].default,
        help="holdout images that rank proposals (from the training data) (default: %(default)s)")
    add("--seed", type=non_negative_int, default=0, help="seed for sampling and initialisation (default: %(default)s)")
    if not baseline_only:
        add("--initial-reduction", type=number(float, 0, 1), default=d["initial_reduction"].default,
            help="latency removed in iteration 1, as a fraction of the original (default: %(default)s)")
        add("--decay", type=number(float, 0, 1), default=d["decay"].default,
            help="each iteration removes this times the previous one's reduction (default: %(default)s)")
        add("--step", type=positive_int, help="channel grid step (default: the LUT's)")
        add("--short-term-steps", type=positive_int, default=d["short_term_steps"].default,
            help="fine-tuning steps per proposal (default: %(default)s)")
        add("--batch-size", type=positive_int, default=d["batch_size"].default, help="images per step (default: %(default)s)")
        add("--short-term-lr", type=positive_float, default=d["short_term_lr"].default,
            help="learning rate of short-term fine-tuning (default: %(default)s)")
        add("--selection", choices=SELECTION_RULES, default=d["selection"].default,
            help="how the best proposal is picked (default: %(default)s)")
        add("--long-term-epochs", type=non_negative_int, default=d["long_term_epochs"].default,
            help="epochs of fine-tuning after the search (default: %(default)s)")
        add("--long-term-lr", type=positive_float, default=d["long_term_lr"].default,
            help="learning rate of long-term fine-tuning (default: %(default)s)")
        add("--resume", action="store_true", help="continue the run in --out after its last completed iteration "
            "(rerunning the same command does this by itself; kept for scripts that pass it)")
        add("--int8", action="store_true", help="also export an int8 model quantized with representative data")
        add("--baseline", action="store_true", help="also train the width-multiplier baseline for the report")
    add_baseline_arguments(parser)
    add_monitor_arguments(parser)
    add("--lut-tolerance", type=positive_float, default=100 * LUT_TOLERANCE, metavar="PCT",
        help="how far the LUT's estimate of the original and its measurement may differ before the command stops "
             "(default: %(default)g)")
    return parser


@dataclasses.dataclass(eq=False)
class _Setup:
    """What both CLIs open: the LUT, the devices, the model, the data."""

    table: object
    estimator: object
    lut_device: object  # measures missing LUT entries (the LUT's own timing), or None
    check_device: object  # measures whole models (longer timing), or None
    device_name: str | None
    model: object
    data: object
    monitor: object = None  # the conditions monitor on lut_device, with the LUT's quiet reference
    lut_tolerance: float = LUT_TOLERANCE


def _open_lut(path: str):
    from lut.latency import LatencyEstimator
    from lut.spec import LutError
    from lut.table import LatencyTable

    try:
        table = LatencyTable.open(path)
        return table, LatencyEstimator(table)
    except LutError as e:
        raise AdapterError(str(e)) from e
    except ValueError as e:  # a row whose key does not parse
        raise AdapterError(f"{path} is a malformed LUT: {e}") from e


def _open_devices(args, meta: dict) -> tuple[object, object, str | None]:
    """The devices for on-demand LUT entries and for the final check; (None, None) when the
    LUT's device is not reachable and none was asked for."""
    from adapter.export import open_final_check_device
    from profiler.devices import open_device
    from profiler.errors import ProfilerError

    name = args.device or meta.get("device")
    backend, threads = meta.get("backend", "cpu"), meta.get("threads", "1")
    if not threads.isdigit():
        raise AdapterError(f"The LUT {args.lut} is malformed: its meta says threads={threads!r}; expected an integer.")
    threads = int(threads)
    try:
        lut_device = open_device(name, backend=backend, threads=threads, devices_file=args.devices)
        check = lut_device if name != "host" else open_final_check_device(name, backend=backend, threads=threads)
    except ProfilerError as e:
        if args.device:
            raise AdapterError(f"Cannot use device {name!r}: {e}") from e
        print(f"warning: the LUT's device {name!r} is not reachable ({e}); nothing will be measured", file=sys.stderr)
        return None, None, None
    wanted = {k: meta.get(k) for k in ("device", "backend", "threads", "delegate")}
    have = {k: str(v) for k, v in lut_device.conditions().items() if k in wanted}
    if any(wanted[k] is not None and wanted[k] != have.get(k) for k in wanted):
        raise AdapterError(
            f"The LUT {args.lut} was measured under {wanted}; device {name!r} measures under {have}. "
            "Use the LUT's device, or a LUT built on this one."
        )
    return lut_device, check, name


def _setup(args) -> _Setup:
    from adapter.data import load_dataset
    from adapter.train import SPLIT_SEED, TrainingRecord, record_path
    from lut.models import load_model

    for what, path in (("--model", args.model), ("--lut", args.lut)):
        if not Path(path).is_file():
            raise AdapterError(f"{what} {path} does not exist.")
    table, estimator = _open_lut(args.lut)
    model = load_model(args.model)
    if getattr(args, "baseline", False):  # what the baseline needs is checked now, not after the search
        from adapter.baseline import alpha_grid, recipe_of

        alpha_grid(recipe_of(model, args.model).alpha, args.alpha_step)
    record = record_path(args.model)
    if record.is_file() and args.holdout > TrainingRecord.load(record).holdout:
        raise AdapterError(
            f"--holdout {args.holdout} is larger than the {TrainingRecord.load(record).holdout} images the base model "
            f"was not trained on ({record}); rank proposals on unseen images: use --holdout ≤ that."
        )
    lut_device, check_device, device_name = _open_devices(args, table.meta)
    monitor = None
    if lut_device is not None:
        from profiler.build_lut import open_monitor

        monitor = open_monitor(lut_device, table, monitor_policy(args), log=lambda message: print(message, flush=True))
    print(f"loading {args.data} at {model.input_shape[1]} px", flush=True)
    data = load_dataset(args.data, resolution=int(model.input_shape[1]), holdout=args.holdout, seed=SPLIT_SEED)
    return _Setup(table, estimator, lut_device, check_device, device_name, model, data, monitor,
                  args.lut_tolerance / 100)


def _config(args):
    from adapter.netadapt import Budget, NetAdaptConfig

    return NetAdaptConfig(
        budget=Budget.parse(args.budget), initial_reduction=args.initial_reduction, decay=args.decay,
        step=args.step, short_term_steps=args.short_term_steps, batch_size=args.batch_size,
        short_term_lr=args.short_term_lr, holdout_size=args.holdout, selection=args.selection,
        long_term_epochs=args.long_term_epochs, long_term_lr=args.long_term_lr, seed=args.seed,
    )


def _long_term(args, setup: _Setup, result, config, out: Path):
    """adapted.keras: the search's model fine-tuned for the long-term epochs (reused on
    --resume when it is the search's model: a resumed search may have gone further)."""
    from adapter.netadapt import long_term_finetune
    from adapter.surgery import channel_counts
    from lut.models import load_model

    path = out / "adapted.keras"
    if args.resume and path.is_file():
        saved = load_model(path)
        if channel_counts(saved) == channel_counts(result.model):
            print(f"reusing {path}")
            return saved, None
    print(f"long-term fine-tuning for {config.long_term_epochs} epochs", flush=True)
    fitted = long_term_finetune(result.model, setup.data, config)
    result.model.save(path)
    return result.model, fitted


def _model_figures(model, estimator, setup: _Setup, x_test, y_test, tflite: bytes) -> dict:
    from adapter.export import tflite_accuracy
    from adapter.netadapt import estimate_ms
    from adapter.surgery import channel_counts
    from adapter.train import evaluate, evaluate_split

    holdout = setup.data.holdout
    return {
        "channels": channel_counts(model),
        "parameters": int(model.count_params()),
        "estimated_ms": estimate_ms(estimator, model),
        "holdout_accuracy": evaluate_split(model, holdout),
        "test_accuracy": evaluate(model, x_test, y_test),
        "tflite_test_accuracy": tflite_accuracy(tflite, x_test, y_test),
    }


def _final_check(args, setup: _Setup, checker, original, adapted, out: Path) -> tuple[dict, dict, object]:
    """Export, measure on the device (interleaved with the original) and score both models."""
    from adapter.export import export_tflite, representative_batches, tflite_accuracy

    print("exporting and measuring", flush=True)
    x_test, y_test = setup.data.test.arrays()
    tflites = {"original": export_tflite(original, out / "original.tflite"),
               "adapted": export_tflite(adapted, out / "adapted.tflite")}
    if getattr(args, "int8", False):
        x_train, _ = setup.data.train.take(min(256, len(setup.data.train))).arrays()
        tflites["adapted_int8"] = export_tflite(
            adapted, out / "adapted_int8.tflite", representative_data=representative_batches(x_train)
        )
    measured = None
    if checker is not None:
        measured = checker.measure({name: tflite for name, tflite in tflites.items() if name != "original"})
    figures = {name: _model_figures(model, setup.estimator, setup, x_test, y_test, tflites[name])
               for name, model in (("original", original), ("adapted", adapted))}
    for name in figures:
        figures[name]["measured_ms"] = measured.median_ms(name) if measured else None
    if "adapted_int8" in tflites:
        figures["adapted"]["int8"] = {
            "measured_ms": measured.median_ms("adapted_int8") if measured else None,
            "tflite_test_accuracy": tflite_accuracy(tflites["adapted_int8"], x_test, y_test),
        }
    return figures["original"], figures["adapted"], measured


def _budget_fields(config, result, original: dict, adapted: dict, measured, checker) -> dict:
    from adapter.final_check import budget_verdict
    from adapter.netadapt import OVER_BUDGET_TOLERANCE, OVER_PRUNED

    budget = config.budget
    fields = {
        "spec": str(budget), "relative": budget.relative, "estimated_ms": result.budget_ms,
        "measured_original_ms": result.measured_original_ms, "recalibrations": list(result.recalibrations),
        "handed_back": result.handed_back, "tolerance": OVER_BUDGET_TOLERANCE, "over_pruned_below": OVER_PRUNED,
        "estimated_fraction": adapted["estimated_ms"] / original["estimated_ms"],
        "met_by_estimate": adapted["estimated_ms"] <= result.budget_ms + 1e-9,
    }
    if checker is None:
        return {**fields, "status": "not measured", "met_measured": None, "requested_fraction": budget.fraction(None),
                "measured_fraction": None, "spread": None, "reason": "no device", "conditions": {}}
    verdict = budget_verdict(budget, measured, measured_original_ms=result.measured_original_ms, last=checker.last,
                             over_budget=OVER_BUDGET_TOLERANCE, over_pruned=OVER_PRUNED)
    return {**fields, "status": verdict.status, "met_measured": verdict.met,
            "requested_fraction": verdict.requested_fraction, "measured_fraction": verdict.measured_fraction,
            "spread": verdict.spread, "reason": verdict.reason, "conditions": dict(verdict.conditions)}


def _baseline_fields(args, setup: _Setup, budget_ms: float, measured_budget, out: Path) -> dict | None:
    from adapter.baseline import BASELINE_DIR, BaselineResult, matched_epochs, recipe_of, run_baseline

    saved = out / BASELINE_DIR / "baseline.json"
    if not getattr(args, "baseline", True):
        return dataclasses.asdict(BaselineResult.load(saved)) if saved.is_file() else None
    if getattr(args, "resume", False) and saved.is_file():
        return dataclasses.asdict(BaselineResult.load(saved))
    recipe = recipe_of(setup.model, args.model)
    epochs = args.baseline_epochs
    if epochs is None:
        epochs = matched_epochs(recipe, out, len(setup.data.train)) or recipe.epochs
    result = run_baseline(
        recipe, setup.data, setup.estimator, budget_ms, out, epochs=epochs, device=setup.check_device,
        select_by=args.select_by, measured_budget_ms=measured_budget, alpha_step=args.alpha_step,
        holdout_size=args.holdout, seed=args.seed, policy=monitor_policy(args),
    )
    return dataclasses.asdict(result)


def _adapt(args) -> int:
    from adapter.netadapt import estimate_ms, run_netadapt
    from adapter.report import write_report

    config = _config(args)
    out = Path(args.out)
    resuming = _resuming(args, config, out)  # decided before anything is loaded, measured or written
    args.resume = resuming
    setup = _setup(args)
    start = time.perf_counter()
    checker = _checker(setup, out)
    measured = None
    if checker is not None and not resuming:
        measured = checker.original_ms(estimate_ms(setup.estimator, setup.model))
        print(f"the original measures {measured:.4g} ms on {setup.device_name}", flush=True)
    try:
        result = run_netadapt(setup.model, setup.data, setup.estimator, config, out, device=setup.lut_device,
                              measured_original_ms=measured, measure=checker.fraction if checker else None,
                              resume=args.resume, policy=monitor_policy(args))
    except AdapterError as e:
        if not str(e).startswith("The budget "):
            raise
        raise AdapterError(f"--budget {args.budget} asks for {_requested(config.budget, measured)}: {e}") from e
    search_seconds = sum(r.seconds for r in result.history)
    long_start = time.perf_counter()
    adapted, _ = _long_term(args, setup, result, config, out)
    long_seconds = time.perf_counter() - long_start
    original, adapted_figures, interleaved = _final_check(args, setup, checker, setup.model, adapted, out)
    budget = _budget_fields(config, result, original, adapted_figures, interleaved, checker)
    measured_budget = None
    if budget["requested_fraction"] is not None and original["measured_ms"] is not None:
        measured_budget = budget["requested_fraction"] * original["measured_ms"]
    report = {
        "model": args.model, "data": args.data, "device": setup.device_name,
        "lut": _lut_fields(args.lut, setup.table, result.step),
        "budget": budget, "original": original, "adapted": adapted_figures,
        "baseline": _baseline_fields(args, setup, result.budget_ms, measured_budget, out),
        "search": {"iterations": len(result.history) - 1, "seconds": search_seconds,
                   "long_term_epochs": config.long_term_epochs, "long_term_seconds": long_seconds,
                   "config": config.to_json()},
        "monitor": setup.monitor.summary() if setup.monitor is not None else None,
        "seconds": time.perf_counter() - start,
    }
    json_path, md_path = write_report(out, report, result.history)
    _print_summary(report, md_path)
    return EXIT_OK if _budget_met(budget) else EXIT_NOT_MET


def _budget_met(budget: dict) -> bool:
    """The verdict the exit code tells: the device's when it took one (an over-pruned model meets
    the budget; "not taken" does not say it does), else the LUT estimate's."""
    if budget["status"] == "not measured":
        return bool(budget["met_by_estimate"])
    return budget["status"] in ("met", "over-pruned")


def _requested(budget, measured_ms: float | None) -> str:
    """The budget as the user asked for it (errors in the LUT's calibrated terms name it too)."""
    if budget.relative and measured_ms is not None:
        return f"{budget} = {budget.ms(measured_ms):.4g} ms of the original's measured {measured_ms:.4g} ms"
    return str(budget)


# NetAdaptConfig fields → the options that set them (for "started with other settings" errors)
_OPTIONS = {"holdout_size": "--holdout"}


def _resuming(args, config, out: Path) -> bool:
    """Whether the run in `out` is this command's, to go on with: a rerun of the same command
    resumes it (as `--resume` does); a run started with other settings is refused, naming them."""
    from adapter.netadapt import STATE_FILE, Budget, read_history

    check_output_folder(out, "--out")
    if not read_history(out):
        return False
    try:
        saved = json.loads((out / STATE_FILE).read_text())
        then = saved["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterError(
            f"--out {out} holds a NetAdapt run whose {STATE_FILE} is missing or unreadable ({e}); expected the "
            "state adapter.adapt writes. Choose another --out, or remove that folder to start over."
        ) from e
    now = config.to_json()
    changed = {key: (then.get(key), value) for key, value in now.items() if then.get(key) != value}
    if saved.get("lut") not in (None, os.path.abspath(args.lut)):
        changed["lut"] = (saved["lut"], os.path.abspath(args.lut))

    def shown(key, value):
        return str(Budget(**value)) if key == "budget" and isinstance(value, dict) else repr(value)

    if changed:
        described = "; ".join(
            f"{_OPTIONS.get(key, '--' + key.replace('_', '-'))} {shown(key, old)} then, {shown(key, new)} now"
            for key, (old, new) in changed.items()
        )
        raise AdapterError(
            f"--out {out} holds a NetAdapt run started with other settings ({described}); expected the same "
            "settings to resume it. Rerun with the settings it was started with, or choose another --out."
        )
    print(f"resuming the NetAdapt run in {out} (started with the same settings)", flush=True)
    return True


def _checker(setup: _Setup, out: Path):
    """The final-check device's `ModelChecker` against the original (None without a device)."""
    from adapter.export import export_tflite
    from adapter.final_check import ModelChecker

    if setup.check_device is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    return ModelChecker(setup.check_device, setup.monitor, export_tflite(setup.model, out / "original.tflite"), out,
                        lut_tolerance=setup.lut_tolerance)


def _lut_fields(path: str, table, step: int) -> dict:
    meta = table.meta
    return {"path": path, "device": meta.get("device"), "backend": meta.get("backend"),
            "threads": meta.get("threads"), "step": step}


def _print_summary(report: dict, md_path: Path) -> None:
    budget, adapted = report["budget"], report["adapted"]
    measured = "not measured" if adapted["measured_ms"] is None else f"measured {adapted['measured_ms']:.4g} ms"
    print(
        f"adapted: estimated {adapted['estimated_ms']:.4g} ms, {measured}: budget {budget['status']} "
        f"({budget['reason']}); test accuracy {adapted['test_accuracy']:.4f} (original {report['original']['test_accuracy']:.4f})"
    )
    if report.get("baseline"):
        b = report["baseline"]
        shown = "—" if b["measured_ms"] is None else f"{b['measured_ms']:.4g} ms"
        print(f"width multiplier α={b['alpha']:g}: measured {shown}, test accuracy {b['test_accuracy']:.4f}")
    print(f"report: {md_path}")


def _baseline_only(args) -> int:
    from adapter.netadapt import Budget, ensure_estimable, estimate_ms
    from lut.keras_specs import specs_of_keras

    out = check_output_folder(args.out, "--out")
    budget = Budget.parse(args.budget)  # bad input fails before anything loads
    setup = _setup(args)
    out.mkdir(parents=True, exist_ok=True)
    ensure_estimable(setup.estimator, specs_of_keras(setup.model), setup.lut_device, policy=monitor_policy(args))
    estimated = estimate_ms(setup.estimator, setup.model)
    checker = _checker(setup, out)
    measured = None if checker is None else checker.original_ms(estimated)
    budget_ms = budget.lut_ms(estimated, measured)
    measured_budget = None if measured is None else budget.ms(measured)
    result = _baseline_fields(args, setup, budget_ms, measured_budget, out)
    shown = "—" if result["measured_ms"] is None else f"{result['measured_ms']:.4g} ms"
    print(f"width multiplier α={result['alpha']:g}: estimated {result['estimated_ms']:.4g} ms (budget {budget_ms:.4g}), "
          f"measured {shown}, test accuracy {result['test_accuracy']:.4f}; saved in {out / 'baseline'}")
    return 0


def run_cli(argv: Sequence[str] | None = None, *, baseline_only: bool = False) -> int:
    """Parse `argv` and adapt (or, `baseline_only`, train the baseline); 2 on bad input."""
    import adapter.baseline  # noqa: F401  (its docstring is the baseline CLI's description)

    parser = _parser(baseline_only)
    args = parser.parse_args(argv)
    if baseline_only:
        args.baseline = True

    def work() -> int:
        from lut.quiet_tf import import_tensorflow_quietly

        import_tensorflow_quietly()
        quiet_litert_notice()
        return _baseline_only(args) if baseline_only else _adapt(args)

    return run_command(
        parser.prog, work,
        on_interrupt="the trained baseline is not saved; run the same command again" if baseline_only
        else "completed iterations are saved; run the same command again to resume",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(argv)


if __name__ == "__main__":
    sys.exit(main())
