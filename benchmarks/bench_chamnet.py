"""Where ChamNet's time goes: one candidate (inherit + fine-tune against from scratch), the
predictor's fit, and the search, with the share of each in a whole predictor build and search.

    .venv/bin/python benchmarks/bench_chamnet.py            # MobileNetV2 α=0.5 at 32 px, Fashion-MNIST

Builds the base model (or loads --model), trains one Sobol candidate of its space both ways
(the default recipe: inherit the base's weights and fine-tune --steps steps; ChamNet's own:
from scratch, one epoch measured, times --scratch-epochs), fits the Gaussian process on
--fitted candidates, measures the space's LUT on this CPU (step --step; or takes --lut) and
runs the genetic algorithm against half the base's estimate. Prints each figure and the
ratio of the from-scratch recipe to the default one, both measured in this run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained base .keras (default: a fresh MobileNetV2 α=0.5 at 32 px)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of the default recipe")
    parser.add_argument("--scratch-epochs", type=int, default=10, help="epochs a from-scratch candidate would train")
    parser.add_argument("--fitted", type=int, default=60, help="candidates the predictor is fitted on")
    parser.add_argument("--step", type=int, default=32, help="channel grid of the space and its LUT")
    parser.add_argument("--lut", help="the space's LUT (default: measured now on this CPU)")
    args = parser.parse_args()

    from lut.quiet_tf import import_tensorflow_quietly

    import_tensorflow_quietly()
    import numpy as np

    from adapter.search.chamnet.build import candidate_of
    from adapter.search.chamnet.candidates import CandidateTrainer, Recipe
    from adapter.search.chamnet.evolution import evolve
    from adapter.search.chamnet.predictor import AccuracyPredictor, macs
    from adapter.search.chamnet.run import candidate_latency_ms, space_models
    from adapter.search.chamnet.space import SearchSpace
    from adapter.training.sources import load_dataset
    from lut.latency import LatencyEstimator
    from lut.models import build_model, load_model
    from lut.table import LatencyTable
    from profiler.build_lut import build_lut, calibrate_cache_context, open_lut
    from profiler.devices import open_device
    from profiler.plan import plan_specs

    base = load_model(args.model) if args.model else build_model("mobilenet_v2", alpha=0.5, resolution=32, classes=10)
    space = SearchSpace.around(candidate_of(base), args.step)
    [candidate] = space.sample(1, seed=7)
    print(f"space around {space.base.text()}: {space.size:.3g} candidates; timing {candidate.text()}")
    data = load_dataset("fashion_mnist", resolution=space.base.resolution, holdout=2000)
    figures = {}
    for name, recipe in (("inherit", Recipe(steps=args.steps)), ("scratch", Recipe(from_scratch_epochs=1))):
        trainer = CandidateTrainer(base, "fashion_mnist", holdout=2000, seed=0, recipe=recipe,
                                   load_dataset=lambda *a, **k: data)
        accuracy, seconds = trainer.train(candidate)
        figures[name] = seconds
        print(f"one candidate, {recipe.describe()}: {seconds:.1f} s (holdout {accuracy:.4f})")
    scratch = figures["scratch"] * args.scratch_epochs
    print(f"  from scratch for {args.scratch_epochs} epochs: {scratch:.0f} s (1 epoch measured × {args.scratch_epochs}); "
          f"{scratch / figures['inherit']:.1f}x the default recipe")

    rng = np.random.default_rng(0)
    fitted = space.sample(args.fitted, seed=1)
    accuracy = [0.6 + 0.05 * np.log(macs(c, 10)) / 20 + rng.normal(0, 0.01) for c in fitted]  # the fit's cost only
    start = time.perf_counter()
    predictor = AccuracyPredictor(space).fit(fitted, accuracy)
    fit_s = time.perf_counter() - start
    print(f"predictor fit on {args.fitted} candidates: {fit_s:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        device = open_device("host", backend="cpu", threads=1)
        lut_path = args.lut or str(Path(tmp) / "space.sqlite")
        start = time.perf_counter()
        with (LatencyTable.open(lut_path) if args.lut else open_lut(lut_path, device, args.step)) as table:
            if not args.lut:
                specs = plan_specs(space_models(space, 10), args.step)
                build_lut(device, specs, table, progress=False)
                calibrate_cache_context(device, table, log=lambda line: None)
            lut_s = time.perf_counter() - start
            estimator = LatencyEstimator(table)
            latency = candidate_latency_ms(estimator, 10)
            budget = 0.5 * latency(space.base)
            result = evolve(space, predictor, latency, budget)
        device.close()
    print(f"space LUT on this CPU: {lut_s:.0f} s{' (given)' if args.lut else ''}; search: {result.seconds:.1f} s over "
          f"{result.evaluated} candidates ({result.feasible} within half the base's estimate)")
    build = (args.fitted + 12) * figures["inherit"]
    total = build + fit_s + result.seconds
    print(f"a predictor of {args.fitted} + 12 held-out candidates and one search: {total / 60:.1f} min — training "
          f"{100 * build / total:.1f}%, fit {100 * fit_s / total:.2f}%, search {100 * result.seconds / total:.2f}% "
          f"(from scratch: {(args.fitted + 12) * scratch / 3600:.1f} h of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
