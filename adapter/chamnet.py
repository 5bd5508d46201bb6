"""ChamNet (Dai et al., CVPR 2019): adapt an architecture's hyper-parameters to a device.

    python -m adapter.chamnet build-predictor --model runs/base.keras --data fashion_mnist --out runs/cham

Builds the accuracy predictor, once per base model, data set, space and recipe (it does not
depend on the device). The space, around the base MobileNet (V1 or V2): per stage the output
channels on the --step grid (from one step up to --grow times the base's), the number of
blocks (1 up to the base's, plus --extra-blocks), the expansion ratio (V2: --expansions),
the stem's and the last 1×1 convolution's widths, and the input resolution (--resolutions,
with the base's). The recipe, the same for every candidate: inherit the base's weights (the
largest-norm filters and the first blocks of each stage) and fine-tune for --steps steps, or
--from-scratch EPOCHS. Candidates: a held-out Sobol set (--held-out, never fitted on: the
predictor's quality is told on it), a Sobol sample (--initial), then rounds of Bayesian
optimization (--per-round by expected improvement) up to --total. Each candidate is
committed to OUT/run.sqlite (and candidates.csv) as it finishes: run the same command again
to go on. (The search against a device's LUT and budget, `search`, is not built yet.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from adapter.search.chamnet.build import candidate_of
from adapter.search.chamnet.candidates import CandidateTrainer, Recipe, build_predictor, open_store
from adapter.search.chamnet.space import SearchSpace
from lut.cli import ArgumentParser, check_output_folder, non_negative_int, positive_float, positive_int, run_parsed

__all__ = ["main"]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas. Received: {text!r}.") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas. Received: {text!r}.")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m adapter.chamnet", description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build-predictor", help="train candidates of the space and fit the accuracy predictor",
                                description=__doc__.split("\n\n", 2)[2].strip())
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
    recipe.add_argument("--holdout", type=positive_int, default=2000,
                        help="training images kept out to measure each candidate's accuracy (default: %(default)s)")
    recipe.add_argument("--seed", type=non_negative_int, default=0, help="(default: %(default)s)")
    sampling = build.add_argument_group("the candidates")
    sampling.add_argument("--total", type=positive_int, default=60, help="candidates fitted on (default: %(default)s)")
    sampling.add_argument("--initial", type=positive_int, default=24, help="of them from the Sobol sample (default: %(default)s)")
    sampling.add_argument("--held-out", type=positive_int, default=12,
                          help="candidates trained only to tell the predictor's quality (default: %(default)s)")
    sampling.add_argument("--per-round", type=positive_int, default=6,
                          help="candidates per round of Bayesian optimization (default: %(default)s)")
    return parser


def _build_predictor(args: argparse.Namespace) -> int:
    from adapter.training.sources import load_dataset
    from lut.models import load_model

    out = check_output_folder(args.out, "--out")
    base_model = load_model(args.model)
    recipe = Recipe(steps=args.steps, lr=args.lr, batch_size=args.batch_size, from_scratch_epochs=args.from_scratch,
                    seed=args.seed)
    space = SearchSpace.around(candidate_of(base_model), args.step, grow=args.grow, extra_blocks=args.extra_blocks,
                               expansions=args.expansions, resolutions=args.resolutions)
    trainer = CandidateTrainer(base_model, args.data, holdout=args.holdout, seed=args.seed, recipe=recipe,
                               load_dataset=load_dataset)
    print(f"space around {space.base.text()}: {space.size:.3g} candidates; recipe: {recipe.describe()}", flush=True)
    with open_store(out) as store:
        built = build_predictor(trainer, space, store, total=args.total, initial=args.initial,
                                held_out=args.held_out, per_round=args.per_round,
                                progress=lambda line: print(line, flush=True))
    print(f"predictor: {built.quality}; FLOPs only: {built.flops_quality} ({out})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_parsed(_parser(), argv, _build_predictor, tensorflow=True,
                      on_interrupt="every trained candidate is saved; run the same command to go on")


if __name__ == "__main__":
    sys.exit(main())
