"""Adapt a trained model to a latency budget on a device, from that device's LUT.

    python -m adapter.adapt --model runs/base.keras --lut luts/host-cpu-1t.sqlite \\
        --budget 0.5 --data fashion_mnist --out runs/adapt

runs NetAdapt (`adapter.search.netadapt`) until the LUT estimate meets the budget, fine-tunes the
result, and writes to --out: adapted.keras, adapted.tflite (as the LUT's ops: float32, or
int8 with adapted_float32.tflite beside it; --int8 adds adapted_int8.tflite to a float32
LUT's), history.csv, proposals.csv, iter_NNN.keras, report.json, report.md
and accuracy_latency.png. The original is measured whole on the device (default: the
LUT's, when reachable) before the search, which calibrates the budget in the LUT's terms
(`Budget.lut_ms`); the exported model is measured after it, and the report says whether
the budget is met there, within a 3% measuring tolerance. `--baseline` also trains the
width-multiplier model that meets the same budget (`adapter.search.width_multiplier`) and puts
it in the report. `--workers N` fine-tunes each iteration's proposals on N Ray workers of a local
cluster (`--ray-address` on an existing one), with the serial run's results at the same threads
per worker (`adapter.search.netadapt.parallel`). Running the same command again resumes an interrupted run (a run in --out
started with other settings is refused, naming them). What it opens and how it measures the
original is `adapter.session`'s, shared with `adapter.baseline`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError
from adapter.final_check import budget_fields, final_figures
from adapter.latency import Budget
from adapter.report import budget_met, print_summary, write_report
from adapter.search.netadapt import (
    HOLDOUT_SIZE,
    SELECTION_RULES,
    NetAdaptConfig,
    NetAdaptResult,
    long_term_finetune,
    read_history,
    read_state,
    run_netadapt,
)
from adapter.search.width_multiplier import add_width_multiplier_arguments, alpha_grid, baseline_fields, recipe_of
from adapter.session import (
    Session,
    add_check_arguments,
    add_session_arguments,
    lut_fields,
    measure_original,
    model_checker,
    open_session,
)
from lut.cli import (
    EXIT_NOT_MET,
    EXIT_OK,
    ArgumentParser,
    check_output_folder,
    non_negative_int,
    number,
    positive_float,
    positive_int,
    run_parsed,
)
from lut.models import load_model
from profiler.cluster import add_cluster_arguments, cluster_config, open_cluster
from profiler.monitor import monitor_policy

__all__ = ["main", "run_cli"]


def _parser() -> argparse.ArgumentParser:
    d = NetAdaptConfig.__dataclass_fields__
    parser = ArgumentParser(prog="python -m adapter.adapt", description=__doc__.split("\n\n")[0].strip())
    add_session_arguments(parser, holdout_default=HOLDOUT_SIZE)
    add = parser.add_argument
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
    add("--int8", action="store_true",
        help="also export the adapted model as int8, quantized with training images, measured beside the float one "
             "(with an int8 LUT, the search and the budget are int8 already, and the float model is exported beside)")
    add("--baseline", action="store_true", help="also train the width-multiplier baseline for the report")
    add_width_multiplier_arguments(parser)
    add_check_arguments(parser)
    add_cluster_arguments(parser)
    return parser


def _config(args: argparse.Namespace) -> NetAdaptConfig:
    return NetAdaptConfig(
        budget=Budget.parse(args.budget), initial_reduction=args.initial_reduction, decay=args.decay,
        step=args.step, short_term_steps=args.short_term_steps, batch_size=args.batch_size,
        short_term_lr=args.short_term_lr, holdout_size=args.holdout, selection=args.selection,
        long_term_epochs=args.long_term_epochs, long_term_lr=args.long_term_lr, seed=args.seed,
    )


def _long_term(args: argparse.Namespace, session: Session, result: NetAdaptResult, config: NetAdaptConfig,
               out: Path) -> tuple[Any, Any]:
    """adapted.keras: the search's model fine-tuned for the long-term epochs (reused on
    --resume when it is the search's model: a resumed search may have gone further)."""
    from adapter.pruning.surgery import channel_counts  # Keras: loads TensorFlow (the CLI loads it in run_command)

    path = out / "adapted.keras"
    if args.resume and path.is_file():
        saved = load_model(path)
        if channel_counts(saved) == channel_counts(result.model):
            print(f"reusing {path}")
            return saved, None
    print(f"long-term fine-tuning for {config.long_term_epochs} epochs", flush=True)
    fitted = long_term_finetune(result.model, session.data, config)
    result.model.save(path)
    return result.model, fitted


def _adapt(args: argparse.Namespace) -> int:
    config = _config(args)
    out = Path(args.out)
    resuming = _resuming(args, config, out)  # decided before anything is loaded, measured or written
    args.resume = resuming
    session = open_session(args, check_model=_check_baseline_grid(args))
    start = time.perf_counter()
    checker = model_checker(session, out)
    measured = None if resuming else measure_original(session, checker)
    cluster = cluster_config(args)
    try:
        with open_cluster(cluster) if cluster else contextlib.nullcontext():
            result = run_netadapt(session.model, session.data, session.estimator, config, out,
                                  device=session.lut_device, measured_original_ms=measured,
                                  measure=checker.fraction if checker else None, resume=args.resume,
                                  policy=monitor_policy(args), cluster=cluster)
    except AdapterError as e:
        if not str(e).startswith("The budget "):
            raise
        raise AdapterError(f"--budget {args.budget} asks for {_requested(config.budget, measured)}: {e}") from e
    search_seconds = sum(r.seconds for r in result.history)
    long_start = time.perf_counter()
    adapted, _ = _long_term(args, session, result, config, out)
    long_seconds = time.perf_counter() - long_start
    print("exporting and measuring", flush=True)
    figures, interleaved = final_figures(
        {"original": session.model, "adapted": adapted}, session.estimator, session.data, checker, out,
        beside_of="adapted" if args.int8 or session.deployment.dtype == "int8" else None, deployment=session.deployment,
    )
    original, adapted_figures = figures["original"], figures["adapted"]
    budget = budget_fields(config.budget, result, original, adapted_figures, interleaved, checker)
    measured_budget = None
    if budget["requested_fraction"] is not None and original["measured_ms"] is not None:
        measured_budget = budget["requested_fraction"] * original["measured_ms"]
    report = {
        "model": args.model, "data": args.data, "device": session.device_name,
        "lut": lut_fields(args.lut, session.table, result.step),
        "budget": budget, "original": original, "adapted": adapted_figures,
        "baseline": baseline_fields(args, session, result.budget_ms, measured_budget, out, train=args.baseline),
        "search": {"method": "NetAdapt", "iterations": len(result.history) - 1, "seconds": search_seconds,
                   "long_term_epochs": config.long_term_epochs, "long_term_seconds": long_seconds,
                   "config": config.to_json()},
        "monitor": session.monitor.summary() if session.monitor is not None else None,
        "seconds": time.perf_counter() - start,
    }
    json_path, md_path = write_report(out, report, result.history)
    print_summary(report, md_path)
    return EXIT_OK if budget_met(budget) else EXIT_NOT_MET


def _requested(budget: Budget, measured_ms: float | None) -> str:
    """The budget as the user asked for it (errors in the LUT's calibrated terms name it too)."""
    if budget.relative and measured_ms is not None:
        return f"{budget} = {budget.ms(measured_ms):.4g} ms of the original's measured {measured_ms:.4g} ms"
    return str(budget)


# NetAdaptConfig fields → the options that set them (for "started with other settings" errors)
_OPTIONS = {"holdout_size": "--holdout"}


def _resuming(args: argparse.Namespace, config: NetAdaptConfig, out: Path) -> bool:
    """Whether the run in `out` is this command's, to go on with: a rerun of the same command
    resumes it (as `--resume` does); a run started with other settings is refused, naming them."""
    check_output_folder(out, "--out")
    if not read_history(out):
        return False
    saved = read_state(out)
    if saved is None or not isinstance(saved.get("config"), dict):
        raise AdapterError(
            f"--out {out} holds a NetAdapt run whose state is missing or unreadable; expected the "
            "state adapter.adapt writes. Choose another --out, or remove that folder to start over."
        )
    then = saved["config"]
    now = config.to_json()
    changed = {key: (then.get(key), value) for key, value in now.items() if then.get(key) != value}
    if saved.get("lut") not in (None, os.path.abspath(args.lut)):
        changed["lut"] = (saved["lut"], os.path.abspath(args.lut))

    def shown(key: str, value: Any) -> str:
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


def _check_baseline_grid(args: argparse.Namespace) -> Any:
    """With --baseline, what the baseline needs of the model is checked before the search, not after it."""
    if not args.baseline:
        return None
    return lambda model: alpha_grid(recipe_of(model, args.model).alpha, args.alpha_step)


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and adapt; 2 on bad input, 1 when the adapted model is over the budget."""
    return run_parsed(_parser(), argv, _adapt, tensorflow=True,
                      on_interrupt="completed iterations are saved; run the same command again to resume")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(argv)


if __name__ == "__main__":
    sys.exit(main())
