"""Train the baseline a user would compare NetAdapt against: the width multiplier scaled down.

    python -m adapter.baseline --model runs/base.keras --lut luts/host-cpu-1t.sqlite \\
        --budget 0.5 --data fashion_mnist --out runs/adapt

finds the largest width multiplier α (on a grid of `--alpha-step` below the base model's)
whose LUT-estimated latency meets the budget (or, with `--select-by measured`, whose
whole-model latency measured on the device meets the measured budget), trains that model
from scratch with the base model's recipe, exports and measures it, and writes
`OUT/baseline/` (baseline.keras, baseline.tflite, baseline.json). `adapter.adapt` puts it
next to the NetAdapt result in its report. Epochs: by default as many as the NetAdapt
model in OUT saw in all (base training + the short-term steps of its chosen proposals +
long-term fine-tuning), else the base model's. The search is
`adapter.search.width_multiplier`; what it opens is `adapter.session`'s, as for `adapter.adapt`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from adapter.latency import Budget, estimate_ms
from adapter.search.netadapt import HOLDOUT_SIZE
from adapter.search.width_multiplier import add_width_multiplier_arguments, alpha_grid, baseline_fields, recipe_of
from adapter.session import (
    add_check_arguments,
    add_session_arguments,
    measure_original,
    model_checker,
    open_session,
)
from lut.cli import ArgumentParser, check_output_folder, run_parsed

__all__ = ["main"]

def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m adapter.baseline", description=__doc__.split("\n\n")[0].strip())
    # the holdout of the NetAdapt run in the same --out (adapter.adapt's default)
    add_session_arguments(parser, holdout_default=HOLDOUT_SIZE)
    add_width_multiplier_arguments(parser)
    add_check_arguments(parser)
    return parser


def _baseline(args: argparse.Namespace) -> int:
    out = check_output_folder(args.out, "--out")
    budget = Budget.parse(args.budget)  # bad input fails before anything loads
    session = open_session(
        args, check_model=lambda model: alpha_grid(recipe_of(model, args.model).alpha, args.alpha_step)
    )
    out.mkdir(parents=True, exist_ok=True)
    estimated = estimate_ms(session.estimator, session.model)
    measured = measure_original(session, model_checker(session, out))
    budget_ms = budget.lut_ms(estimated, measured)
    measured_budget = None if measured is None else budget.ms(measured)
    result = baseline_fields(args, session, budget_ms, measured_budget, out)
    assert result is not None  # trained now
    shown = "—" if result["measured_ms"] is None else f"{result['measured_ms']:.4g} ms"
    print(f"width multiplier α={result['alpha']:g}: estimated {result['estimated_ms']:.4g} ms (budget {budget_ms:.4g}), "
          f"measured {shown}, test accuracy {result['test_accuracy']:.4f}; saved in {out / 'baseline'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_parsed(_parser(), argv, _baseline, tensorflow=True,
                      on_interrupt="the trained baseline is not saved; run the same command again")


if __name__ == "__main__":
    sys.exit(main())
