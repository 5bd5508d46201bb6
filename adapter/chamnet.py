"""ChamNet (Dai et al., CVPR 2019): adapt an architecture's hyper-parameters to a device.

    python -m adapter.chamnet build-predictor --model runs/base.keras --data fashion_mnist --out runs/cham
    python -m adapter.chamnet build-lut --predictor runs/cham --device host --out luts/cham-host.sqlite
    python -m adapter.chamnet search --predictor runs/cham --lut luts/cham-host.sqlite --budget 0.5 --out runs/cham50

`build-predictor` builds the accuracy predictor, once per base model, data set, space and
recipe (it does not depend on the device). `build-lut` measures on a device every LUT entry
the space's candidates can have. `search` retargets the stored predictor to one device's
LUT and budget: a genetic algorithm finds the candidates of highest predicted accuracy the
LUT says meet the budget (seconds; no candidate is trained), the best that the device
confirms is trained with NetAdapt's final recipe, exported, measured interleaved with the
original, and reported.

The space, around the base MobileNet (V1 or V2): per stage the output channels on the --step
grid (from one step up to --grow times the base's), the number of blocks (1 up to the base's,
plus --extra-blocks), the expansion ratio (V2: --expansions), the stem's and the last 1×1
convolution's widths, and the input resolution (--resolutions, with the base's). The recipe,
the same for every candidate: inherit the base's weights (the largest-norm filters and the
first blocks of each stage) and fine-tune for --steps steps, or --from-scratch EPOCHS.
Candidates, all of --region-macs times the base's MACs: a held-out Sobol set (--held-out,
never fitted on: the predictor's quality is told on it), a Sobol sample (--initial), then
rounds of Bayesian optimization (--per-round by expected improvement) up to --total. Each
candidate is committed to OUT/run.sqlite (and candidates.csv) as it finishes: run the same
command again to go on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError
from adapter.latency import OVER_BUDGET_TOLERANCE, Budget
from adapter.search.chamnet.candidates import CandidateTrainer, MacsRegion, Recipe, build_predictor, open_store
from adapter.search.chamnet.space import SearchSpace
from adapter.search.netadapt import NetAdaptConfig
from adapter.training.data import DEFAULT_HOLDOUT
from lut.cli import (
    EXIT_NOT_MET,
    EXIT_OK,
    ArgumentParser,
    check_output_folder,
    non_negative_int,
    positive_float,
    positive_int,
    run_parsed,
)

__all__ = ["main"]

_FINAL = NetAdaptConfig.__dataclass_fields__  # the final recipe is NetAdapt's long-term fine-tuning


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas. Received: {text!r}.") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas. Received: {text!r}.")
    return values


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers LOW,HIGH. Received: {text!r}.") from None
    if not 0 <= low < high:
        raise argparse.ArgumentTypeError(f"expected 0 ≤ LOW < HIGH. Received: {text!r}.")
    return low, high


def _parser() -> argparse.ArgumentParser:
    parts = __doc__.split("\n\n")
    parser = ArgumentParser(prog="python -m adapter.chamnet", description=parts[0].strip())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build-predictor", help="train candidates of the space and fit the accuracy predictor",
                                description="\n\n".join(parts[3:]).strip())
    add = build.add_argument
    add("--model", required=True, help="the trained base model (.keras, a MobileNet V1/V2 from python -m adapter.train)")
    add("--data", default="fashion_mnist", help="'fashion_mnist', an image folder or an .npz (default: %(default)s)")
    add("--out", required=True, help="the predictor's folder (run.sqlite, candidates.csv, chamnet.json)")
    space = build.add_argument_group("the space")
    space.add_argument("--step", type=positive_int, default=8, help="channel grid step (default: %(default)s)")
    space.add_argument("--grow", type=positive_float, default=1.5,
                       help="widest choice as a multiple of the base's widths (default: %(default)s)")
    space.add_argument("--extra-blocks", type=non_negative_int, default=0,
                       help="blocks a stage may have beyond the base's (default: %(default)s)")
    space.add_argument("--expansions", type=_int_list, default=(1, 4, 5, 6),
                       help="MobileNetV2 expansion ratios (default: 1,4,5,6)")
    space.add_argument("--resolutions", type=_int_list, default=(),
                       help="input resolutions besides the base's, e.g. 40,48 (default: the base's only)")
    recipe = build.add_argument_group("the recipe (the same for every candidate)")
    recipe.add_argument("--steps", type=positive_int, default=Recipe.steps,
                        help="fine-tuning steps after inheriting the base's weights (default: %(default)s)")
    recipe.add_argument("--lr", type=positive_float, default=Recipe.lr, help="fine-tuning learning rate (default: %(default)s)")
    recipe.add_argument("--batch-size", type=positive_int, default=Recipe.batch_size, help="(default: %(default)s)")
    recipe.add_argument("--from-scratch", type=positive_int, metavar="EPOCHS", default=0,
                        help="train every candidate from scratch for EPOCHS instead (ChamNet's protocol; for GPUs)")
    recipe.add_argument("--holdout", type=positive_int, default=DEFAULT_HOLDOUT,
                        help="training images the base was not trained on that measure each candidate's accuracy, "
                             "at most the base's (adapter.train's --holdout) (default: %(default)s)")
    recipe.add_argument("--seed", type=non_negative_int, default=0, help="(default: %(default)s)")
    sampling = build.add_argument_group("the candidates")
    sampling.add_argument("--total", type=positive_int, default=60, help="candidates fitted on (default: %(default)s)")
    sampling.add_argument("--initial", type=positive_int, default=24, help="of them from the Sobol sample (default: %(default)s)")
    sampling.add_argument("--held-out", type=positive_int, default=12,
                          help="candidates trained only to tell the predictor's quality (default: %(default)s)")
    sampling.add_argument("--per-round", type=positive_int, default=6,
                          help="candidates per round of Bayesian optimization (default: %(default)s)")
    sampling.add_argument("--region-macs", type=_range, default=(0.1, 1.0), metavar="LOW,HIGH",
                          help="every candidate (held-out, Sobol and Bayesian optimization's) has LOW..HIGH times the "
                               "base's MACs, where the budgets that matter lie (default: 0.1,1.0)")
    from profiler.cluster import add_cluster_arguments

    add_cluster_arguments(build.add_argument_group("training in parallel (each set of candidates spread over Ray workers)"))

    from profiler.build_lut import add_build_arguments

    lut = commands.add_parser("build-lut", help="measure every LUT entry the space's candidates can have on a device",
                              description="Plan the entries of the widest, deepest candidate of the predictor's space at "
                                          "each resolution on the --step grid (every candidate's specs are theirs with "
                                          "fewer channels) and measure those the LUT lacks, as profiler.build_lut does "
                                          "(count and expected time first; resumable).")
    lut.add_argument("--predictor", required=True, help="the folder build-predictor wrote")
    add_build_arguments(lut)

    from adapter.session import add_check_arguments

    search = commands.add_parser("search", help="the best candidate for one device's LUT and budget: search, train, "
                                 "export, measure, report", description=parts[2].strip())
    add = search.add_argument
    add("--predictor", required=True, help="the folder build-predictor wrote")
    add("--lut", required=True, help="the device's LUT (build-lut, or profiler.build_lut)")
    add("--budget", required=True, help="a fraction of the original's latency (0.5, or 50%%) or milliseconds (12ms)")
    add("--out", required=True, help="output folder (adapted.keras, adapted.tflite, top.csv, report.md ...)")
    add("--device", help="device that measures missing entries and the final model (default: the LUT's, when reachable)")
    add("--devices", metavar="FILE", help="devices.toml registry for phones")
    add("--top", type=positive_int, default=5, help="candidates kept, best first; the device checks them in that "
        "order (default: %(default)s)")
    add("--population", type=positive_int, default=64, help="genetic algorithm's population (default: %(default)s)")
    add("--generations", type=positive_int, default=40, help="its generations (default: %(default)s)")
    add("--epochs", type=non_negative_int, default=_FINAL["long_term_epochs"].default,
        help="final fine-tuning epochs of the winner, after inheriting the base's weights (NetAdapt's long-term "
             "epochs; default: %(default)s)")
    add("--lr", type=positive_float, default=_FINAL["long_term_lr"].default,
        help="its learning rate (default: %(default)s)")
    add("--batch-size", type=positive_int, default=_FINAL["batch_size"].default, help="(default: %(default)s)")
    add("--search-only", action="store_true", help="search and write top.csv, train nothing (retargeting in seconds)")
    add("--seed", type=non_negative_int, default=0, help="(default: %(default)s)")
    add_check_arguments(search)
    return parser


# --------------------------------------------------------------------------- build-predictor
def _build_predictor(args: argparse.Namespace) -> int:
    from adapter.search.chamnet.build import candidate_of
    from adapter.session import check_holdout
    from adapter.training.sources import load_dataset
    from lut.models import load_model
    from profiler.cluster import cluster_config, open_cluster

    out = check_output_folder(args.out, "--out")
    check_holdout(args.model, args.holdout)
    base_model = load_model(args.model)
    recipe = Recipe(steps=args.steps, lr=args.lr, batch_size=args.batch_size, from_scratch_epochs=args.from_scratch,
                    seed=args.seed)
    space = SearchSpace.around(candidate_of(base_model), args.step, grow=args.grow, extra_blocks=args.extra_blocks,
                               expansions=args.expansions, resolutions=args.resolutions)
    trainer = CandidateTrainer(base_model, args.data, holdout=args.holdout, seed=args.seed, recipe=recipe,
                               load_dataset=load_dataset)
    print(f"space around {space.base.text()}: {space.size:.3g} candidates; recipe: {recipe.describe()}", flush=True)
    cluster = cluster_config(args)
    with open_store(out) as store, open_cluster(cluster) if cluster else contextlib.nullcontext():
        built = build_predictor(trainer, space, store, total=args.total, initial=args.initial,
                                held_out=args.held_out, per_round=args.per_round,
                                region=MacsRegion(*args.region_macs),
                                model_path=str(Path(args.model).resolve()),
                                progress=lambda line: print(line, flush=True), cluster=cluster)
    print(f"predictor: {built.quality}; FLOPs only: {built.flops_quality} ({out})")
    return 0


# --------------------------------------------------------------------------- build-lut
def _build_lut(args: argparse.Namespace) -> int:
    from adapter.search.chamnet.run import load_predictor, space_models
    from profiler.build_lut import build_luts, check_build_outputs

    check_build_outputs(args)
    stored = load_predictor(args.predictor)
    if args.step is None:
        args.step = stored.space.step
    models = space_models(stored.space, stored.classes)
    print(f"the space of {stored.folder}: widest candidates {', '.join(m.name for m in models)}", file=sys.stderr)
    return build_luts(args, models)


# --------------------------------------------------------------------------- search
@dataclasses.dataclass(frozen=True)
class _Outcome:
    """The search's outcome as the report reads it (`adapter.final_check.SearchOutcome`)."""

    budget_ms: float
    measured_original_ms: float | None
    recalibrations: tuple = ()
    handed_back: dict | None = None


def _session(args: argparse.Namespace, stored: Any) -> Any:
    from adapter.search.chamnet.run import check_base
    from adapter.session import open_session

    identity = stored.identity
    args.model, args.data, args.holdout = stored.model_path, identity["data"], int(identity["holdout"])
    if Path(args.lut).is_file() and (dtype := _lut_dtype(args.lut)) != "float32":
        raise AdapterError(f"{args.lut} is an {dtype} LUT; the ChamNet search estimates float32 candidates only so far. "
                           "Build a float32 LUT (`python -m adapter.chamnet build-lut` without --dtype), or adapt "
                           "for int8 with NetAdapt (`python -m adapter.adapt --lut` that LUT).")
    return open_session(args, check_model=lambda model: check_base(stored, model, stored.model_path))


def _lut_dtype(path: str) -> str:
    from lut.table import LatencyTable

    with LatencyTable.open(path) as table:
        return table.dtype


def _ensure_space(session: Any, stored: Any, args: argparse.Namespace) -> None:
    """Every entry the space's candidates can have, measured on the LUT's device when missing."""
    from adapter.latency import ensure_estimable
    from adapter.search.chamnet.run import space_models
    from profiler.monitor import monitor_policy
    from profiler.plan import plan_specs

    planned = plan_specs(space_models(stored.space, stored.classes), int(session.table.meta.get("step", stored.space.step)))
    ensure_estimable(session.estimator, planned, session.lut_device, policy=monitor_policy(args),
                     log=lambda line: print(line, flush=True))


def _confirmed(found: Sequence[Any], checker: Any, budget: Budget, build: Any) -> tuple[Any, list[dict[str, Any]]]:
    """The first of `found` (best first) whose measured fraction of the original meets the budget
    (the device's check of the LUT's verdict), and every check made; the best when nothing measures."""
    checks: list[dict[str, Any]] = []
    if checker is None or not budget.relative:
        return found[0], checks
    for f in found:
        fraction = checker.fraction(build(f.candidate), name="candidate")
        checks.append({"candidate": f.candidate.text(), "measured_fraction": fraction})
        print(f"device check {f.candidate.text()}: "
              + ("disturbed" if fraction is None else f"{fraction:.1%} of the original"), flush=True)
        if fraction is not None and fraction <= budget.value * (1 + OVER_BUDGET_TOLERANCE):
            return f, checks
    return found[0], checks


def _search(args: argparse.Namespace) -> int:
    from adapter.final_check import budget_fields, final_figures
    from adapter.latency import estimate_ms
    from adapter.report import budget_met, print_summary, write_report
    from adapter.search.chamnet.build import build
    from adapter.search.chamnet.evolution import evolve
    from adapter.search.chamnet.run import candidate_latency_ms, load_predictor, train_final
    from adapter.session import lut_fields, measure_original, model_checker
    from adapter.train import SPLIT_SEED
    from adapter.training.sources import load_dataset

    out = check_output_folder(args.out, "--out")
    budget = Budget.parse(args.budget)
    stored = load_predictor(args.predictor)
    print(f"predictor {stored.folder}: {len(stored.fitted)} trained candidates; "
          f"{stored.quality or 'no held-out candidates'}", flush=True)
    session = _session(args, stored)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _ensure_space(session, stored, args)
    checker = model_checker(session, out)
    estimated = estimate_ms(session.estimator, session.model)
    measured = measure_original(session, checker)
    budget_ms = budget.lut_ms(estimated, measured)
    latency_ms = candidate_latency_ms(session.estimator, stored.classes)
    result = evolve(stored.space, stored.predictor, latency_ms, budget_ms, top=args.top, population=args.population,
                    generations=args.generations, seed=args.seed)
    search_seconds = time.perf_counter() - start
    print(f"searched {result.evaluated} candidates ({result.feasible} within {budget_ms:.4g} ms by the LUT) in "
          f"{result.seconds:.1f} s", flush=True)
    top = [{"candidate": f.candidate.text(), "holdout_accuracy": f.predicted_accuracy, "estimated_ms": f.estimated_ms,
            "estimated_fraction": f.estimated_ms / estimated} for f in result.top]
    _write_top(out / "top.csv", top)
    for row in top:
        print(f"  {row['candidate']}: predicted {row['holdout_accuracy']:.4f}, estimated {row['estimated_ms']:.4g} ms "
              f"({row['estimated_fraction']:.1%} of the original)", flush=True)
    if args.search_only:
        print(f"top candidates: {out / 'top.csv'} (search only: nothing trained)")
        return EXIT_OK
    winner, checks = _confirmed(result.top, checker, budget, lambda c: build(c, stored.classes))
    for row in top:
        row["measured_fraction"] = next((c["measured_fraction"] for c in checks if c["candidate"] == row["candidate"]),
                                        None)
    data = session.data
    if winner.candidate.resolution != stored.space.base.resolution:
        data = load_dataset(stored.identity["data"], resolution=winner.candidate.resolution,
                            holdout=int(stored.identity["holdout"]), seed=SPLIT_SEED)
    final_start = time.perf_counter()
    print(f"final training of {winner.candidate.text()}: inherit the base's weights, {args.epochs} epochs", flush=True)
    adapted = train_final(winner.candidate, session.model, data, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, seed=args.seed)
    final_seconds = time.perf_counter() - final_start
    adapted.save(out / "adapted.keras")
    print("exporting and measuring", flush=True)
    if data is session.data:
        figures, interleaved = final_figures({"original": session.model, "adapted": adapted}, session.estimator, data,
                                             checker, out)
    else:  # another resolution: each model is scored on its own input size, both measured together
        figures, interleaved = final_figures({"adapted": adapted}, session.estimator, data, checker, out)
        figures.update(final_figures({"original": session.model}, session.estimator, session.data, None, out)[0])
        figures["original"]["measured_ms"] = interleaved.median_ms("original") if interleaved else None
    original, adapted_figures = figures["original"], figures["adapted"]
    report = {
        "model": stored.model_path, "data": stored.identity["data"], "device": session.device_name,
        "lut": lut_fields(args.lut, session.table, stored.space.step),
        "budget": budget_fields(budget, _Outcome(budget_ms, measured), original, adapted_figures, interleaved, checker),
        "original": original, "adapted": {**adapted_figures, "candidate": winner.candidate.text(),
                                          "predicted_accuracy": winner.predicted_accuracy},
        "baseline": None,
        "search": {"method": "ChamNet", "iterations": args.generations, "seconds": search_seconds,
                   "text": f"a genetic algorithm over {result.evaluated} candidates ({result.feasible} within the "
                           f"budget by the LUT; predictor of {len(stored.fitted)} trained candidates, "
                           f"{stored.quality or 'not tested'})",
                   "final_text": "inherit the base's weights and fine-tune", "long_term_epochs": args.epochs,
                   "long_term_seconds": final_seconds, "candidates": top, "device_checks": checks,
                   "predictor": str(stored.folder)},
        "monitor": session.monitor.summary() if session.monitor is not None else None,
        "seconds": time.perf_counter() - start,
    }
    _, md_path = write_report(out, report, [])
    print_summary(report, md_path)
    return EXIT_OK if budget_met(report["budget"]) else EXIT_NOT_MET


def _write_top(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["candidate", "holdout_accuracy", "estimated_ms", "estimated_fraction"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _run(args: argparse.Namespace) -> int:
    return {"build-predictor": _build_predictor, "build-lut": _build_lut, "search": _search}[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_parsed(_parser(), argv, _run, tensorflow=True,
                      on_interrupt="every trained candidate and measured entry is saved; run the same command to go on")


if __name__ == "__main__":
    sys.exit(main())
