"""Cost of one NetAdapt iteration: where the time goes, and what the naive way costs.

    python benchmarks/bench_netadapt_iteration.py [--lut luts/host-cpu-1t.sqlite] [--model base.keras] [--workers 2]

MobileNetV1 α=0.5 at 32 px on Fashion-MNIST, every proposal, 50 short-term steps of batch
128 per proposal, a 2,000-image holdout, Δ = 2.5% of the original latency. Runs two
iterations of `adapter.search.netadapt.run_iteration` (the first includes the one-time trace of
the training step) and prints the split of the second: surgery (filter ranking, weight
slicing, the winner's Keras rebuild), short-term fine-tuning (incl. BN recalibration),
holdout evaluation and LUT estimation. Then, in the same process, the naive ways:
estimating every candidate count by walking the whole model (`specs_of_keras` per
candidate), and building + `model.fit`-training each proposal as its own Keras model
(measured on --naive-proposals proposals and scaled to all).

With --workers N it then runs the same two iterations on a local Ray cluster, on 1 worker and on N
workers of --threads-per-worker threads each, --rounds times in ABBA order (this machine's speed
drifts over minutes), and prints the second iteration's wall time of each, each round's ratio
and their median, the ratio to the single-process run, and whether every proposal's holdout
accuracy and the chosen proposal are the same in every run.

Targets (issue 4): surgery + LUT estimation < 10% of the iteration; iteration < 60 s.
Target (issue 13): N=2 workers ≥ 1.7× one worker at the same threads per worker, same results.
Without --lut (or if the file is missing) the LUT is built for the model first (~6 min).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lut", default="luts/host-cpu-1t-mobilenet_v1-0.5-32.sqlite", help="host LUT of the model (built if missing)")
    parser.add_argument("--model", help="a trained .keras MobileNetV1 α=0.5 32 px (default: a new one; timing does not depend on weights)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--holdout", type=int, default=2000)
    parser.add_argument("--reduction", type=float, default=0.025)
    parser.add_argument("--naive-proposals", type=int, default=2, help="proposals trained the naive way (0: skip)")
    parser.add_argument("--workers", type=int, default=0, help="also run on 1 and on N Ray workers (0: skip)")
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of 1-worker and N-worker runs (ABBA order)")
    return parser.parse_args()


def _lut(path: str, model):
    """The LUT at `path`; built first (every spec of the model, step 8) if there is none."""
    from lut.latency import LatencyEstimator
    from lut.table import LatencyTable
    from profiler.build_lut import build_lut, open_lut
    from profiler.devices import open_device
    from profiler.plan import plan_specs

    if not Path(path).is_file():
        device = open_device("host", threads=1)
        specs = plan_specs([model], 8)
        print(f"building the LUT {path} ({len(specs)} entries) ...", flush=True)
        with open_lut(path, device, 8) as table:
            print(build_lut(device, specs, table, progress=False), flush=True)
    return LatencyEstimator(LatencyTable.open(path))


def _naive_estimation(run, model, record, target_ms: float) -> float:
    """Seconds to find the proposals by estimating each candidate count on the whole model."""
    from adapter.pruning.graph import find_groups
    from lut.keras_specs import specs_of_keras

    start = time.perf_counter()
    for group in find_groups(model):
        for count in range((group.size - 1) // run.step * run.step, 0, -run.step):
            specs = specs_of_keras(model, {name: count for name in group.producers})
            if run.estimator.total_us(specs) / 1000 <= target_ms:
                break
    return time.perf_counter() - start


def _naive_training(run, model, iteration: int, proposals: int) -> tuple[float, int]:
    """Seconds per proposal built with `prune` and trained with `model.fit` (one trace each)."""
    from adapter.pruning.graph import analyze
    from adapter.search.netadapt import proposals, search

    keras_trainer = proposals._KerasProposals(model, run.config)
    graph = analyze(model)
    batches = search._iteration_batches(run, iteration)
    times = dict.fromkeys(("surgery_s", "finetune_s", "evaluate_s"), 0.0)
    groups = [g for g in graph.groups if g.size > 8][:proposals]
    for group in groups:
        keep = {group.id: proposals._kept_channels(model, group, group.size - 8)}
        keras_trainer.train(model, graph, None, keep, batches, times)
    return {k: v / len(groups) for k, v in times.items()}, len(groups)


def main() -> int:
    args = _args()
    from adapter.latency import Budget
    from adapter.search import netadapt
    from adapter.training.sources import load_dataset
    from lut.models import build_model, load_model

    model = load_model(args.model) if args.model else build_model("mobilenet_v1", alpha=0.5, resolution=32, classes=10)
    estimator = _lut(args.lut, model)
    data = load_dataset("fashion_mnist", resolution=32, holdout=args.holdout)
    config = netadapt.NetAdaptConfig(
        Budget(0.5, relative=True), initial_reduction=args.reduction, short_term_steps=args.steps,
        batch_size=args.batch_size, holdout_size=args.holdout, long_term_epochs=0,
    )
    with tempfile.TemporaryDirectory() as out:
        run, records, rows = _two_iterations(model, data, estimator, config, out)
        _report(records[1][0], args.steps, args.batch_size)
        print(f"  (on an otherwise idle machine the wall time is about the CPU time / {os.cpu_count()}, "
              "TensorFlow using every core)")
        steady_model = records[1][1]
        naive_lut = _naive_estimation(run, steady_model, records[1][0], records[1][0].target_ms)
        print(f"\nnaive LUT estimation (whole-model specs per candidate): {naive_lut:.2f} s "
              f"vs {records[1][0].estimate_s:.2f} s here ({naive_lut / max(records[1][0].estimate_s, 1e-9):.0f}×)")
        if args.naive_proposals:
            per, n = _naive_training(run, steady_model, 2, args.naive_proposals)
            rec = records[1][0]
            naive_total = sum(per.values()) * rec.proposals + rec.estimate_s
            print(f"naive proposals (clone_model surgery + model.fit, measured on {n}): per proposal "
                  f"surgery {per['surgery_s']:.2f} s, fine-tune {per['finetune_s']:.2f} s, evaluate {per['evaluate_s']:.2f} s; "
                  f"an iteration of {rec.proposals} proposals ≈ {naive_total:.0f} s vs {rec.seconds:.0f} s here")
        if args.workers:
            _on_workers(args, model, data, estimator, config, records[1][0], rows)
    return 0


def _two_iterations(model, data, estimator, config, out, cluster=None, label="this process"):
    """Iterations 1 and 2 from `model`; the run, (record, model) of each, and iteration 2's proposal rows."""
    from adapter.search import netadapt

    start = time.perf_counter()
    run = netadapt.prepare_run(model, data, estimator, config, out, log=lambda line: None, cluster=cluster)
    print(f"[{label}] prepare_run (holdout, estimate, proposal trainer): {time.perf_counter() - start:.1f} s")
    previous = netadapt.IterationRecord(0, "", 0, {}, run.original_ms, run.original_ms, 0.0, 0, 0.0)
    records, current, rows = [], model, []
    for iteration in (1, 2):
        cpu, load = time.process_time(), os.getloadavg()[0]
        record, rows, current_next = netadapt.run_iteration(run, iteration, current, previous)
        cpu = time.process_time() - cpu
        records.append((record, current))
        print(f"[{label}] iteration {iteration}: {record.proposals} proposals, {record.seconds:.1f} s wall, {cpu:.1f} s "
              f"CPU of this process on {os.cpu_count()} cores, load average {load:.1f} → {os.getloadavg()[0]:.1f} "
              f"(chose {record.group} → {record.count}, estimated {record.estimated_ms:.4g} ms)", flush=True)
        previous, current = record, current_next
    return run, records, rows


def _on_workers(args, model, data, estimator, config, serial, serial_rows) -> None:
    """The same two iterations on 1 and on N Ray workers, --rounds times in ABBA order; iteration 2 compared.

    This machine's speed drifts by tens of percent over minutes, so one measurement of each
    setting says little: each round's ratio pairs two runs taken back to back, and the median
    over the rounds is the figure.
    """
    import statistics

    from profiler.cluster import ClusterConfig, open_cluster

    def figures(rows):
        return [(r["group"], r["count"], r["holdout_accuracy"], r["chosen"]) for r in rows]

    threads = args.threads_per_worker
    seconds: dict[int, list[float]] = {1: [], args.workers: []}
    found = set()
    with open_cluster(ClusterConfig(args.workers, threads_per_worker=threads)):
        for round_ in range(args.rounds):
            for workers in ((1, args.workers) if round_ % 2 == 0 else (args.workers, 1)):
                with tempfile.TemporaryDirectory() as out:
                    label = (f"round {round_ + 1}, {workers} worker{'s' if workers > 1 else ''} × "
                             f"{threads} thread{'s' if threads > 1 else ''}")
                    # the run (its pool of actors) is dropped here: the next pool gets every CPU
                    records, rows = _two_iterations(model, data, estimator, config, out,
                                                    ClusterConfig(workers, threads_per_worker=threads), label)[1:]
                    seconds[workers].append(records[1][0].seconds)
                    found.add(tuple(figures(rows)))
    one, many = seconds[1], seconds[args.workers]
    ratios = [a / b for a, b in zip(one, many)]
    print(f"\niteration 2 wall: this process (TensorFlow on every core) {serial.seconds:.1f} s; per round, 1 worker "
          f"{', '.join(f'{s:.1f}' for s in one)} s; {args.workers} workers {', '.join(f'{s:.1f}' for s in many)} s")
    print(f"  {args.workers} workers vs 1 worker (same threads per worker), per round: "
          f"{', '.join(f'{r:.2f}×' for r in ratios)}; median {statistics.median(ratios):.2f}× (target ≥ 1.7×); "
          f"vs this process: {serial.seconds / statistics.median(many):.2f}× (medians)")
    print(f"  every proposal's holdout accuracy and the chosen one, over all {2 * args.rounds} worker runs: "
          f"{'the same' if len(found) == 1 else 'DIFFERENT'}; vs this process: "
          f"{'the same' if found == {tuple(figures(serial_rows))} else 'different (another thread count: another float order)'}")


def _report(record, steps: int, batch_size: int) -> None:
    parts = {
        "surgery": record.surgery_s, "short-term fine-tune": record.finetune_s,
        "evaluation": record.evaluate_s, "LUT estimation": record.estimate_s,
    }
    other = record.seconds - sum(parts.values())
    print(f"\none iteration (the second; the first includes the one-time trace): {record.seconds:.1f} s, "
          f"{record.proposals} proposals × {steps} steps of batch {batch_size}")
    for name, seconds in [*parts.items(), ("other (batches, selection)", other)]:
        print(f"  {name:28s} {seconds:7.2f} s  {seconds / record.seconds:6.1%}")
    share = (record.surgery_s + record.estimate_s) / record.seconds
    print(f"  surgery + LUT estimation: {share:.1%} of the iteration (target < 10%); "
          f"iteration {'<' if record.seconds < 60 else '≥'} 60 s")


if __name__ == "__main__":
    sys.exit(main())
