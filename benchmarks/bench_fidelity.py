"""Does a LUT survive a disturbed build? The same host LUT built three times, compared.

    .venv/bin/python benchmarks/bench_fidelity.py [--alpha 0.5 --resolution 128 --step 16 --variants 20]

1. quiet: built with the conditions monitor, nothing else started;
2. disturbed, monitored: built with the monitor while a competing process (a CPU-bound
   numpy matrix product, the issue's) is started and stopped at random times;
3. disturbed, unmonitored: the same disturbance, `--no-monitor` (what phonefit did before).

Then 20 random pruned variants of MobileNetV1 are estimated with each LUT, and the median
and largest disagreement of LUTs 2 and 3 with LUT 1 are printed, with their ratio. The
target: the monitored disturbed LUT agrees with the quiet one within 3% (median).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_COMPETITOR = "import numpy as n; a=n.ones((2048,2048)); any(a@a is None for _ in iter(int,1))"


class _Disturbance:
    """Starts and stops the competing process at random times (on/off phases of 2–15 s)."""

    def __init__(self, seed: int):
        self._rng, self._stop, self._process = random.Random(seed), threading.Event(), None
        self.on_seconds = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self._process = subprocess.Popen([sys.executable, "-c", _COMPETITOR])
            on = self._rng.uniform(2, 15)
            self._stop.wait(on)
            self.on_seconds += on
            self._process.kill()
            self._process.wait()
            self._stop.wait(self._rng.uniform(2, 15))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._process is not None and self._process.poll() is None:
            self._process.kill()


def _build(path: str, args, *extra: str) -> float:
    start = time.perf_counter()
    command = [sys.executable, "-m", "profiler.build_lut", "--device", "host", "--model", "mobilenet_v1",
               "--alpha", str(args.alpha), "--resolution", str(args.resolution), "--classes", "10",
               "--step", str(args.step), "--out", path, "--no-progress", "--wait-quiet", "60", "--tries", "8", *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"build_lut failed: {result.stderr[-2000:]}")
    print("   ", result.stdout.strip().splitlines()[-1], flush=True)
    return time.perf_counter() - start


def _times(slope: float | None) -> str:
    return "an unknown share of" if slope is None else f"{slope:.2f}×"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--step", type=int, default=16)
    parser.add_argument("--variants", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="keep the three LUTs here (default: a temporary folder)")
    args = parser.parse_args()

    import numpy as np

    from lut.quiet_tf import import_tensorflow_quietly

    import_tensorflow_quietly()
    from adapter.pruning.graph import find_groups
    from adapter.pruning.surgery import prune_to_counts
    from lut.latency import LatencyEstimator, specs_of
    from lut.models import build_model
    from lut.table import LatencyTable
    from profiler.plan import channel_grid

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.dir or scratch
        os.makedirs(tmp, exist_ok=True)
        paths = {name: f"{tmp}/{name}.sqlite" for name in ("quiet", "monitored", "unmonitored")}
        print("1. quiet build", flush=True)
        seconds = {"quiet": _build(paths["quiet"], args)}
        for name, extra in (("monitored", ()), ("unmonitored", ("--no-monitor",))):
            print(f"2. disturbed build, {name}", flush=True)
            with _Disturbance(args.seed) as disturbance:
                seconds[name] = _build(paths[name], args, *extra)
            print(f"    competitor ran {disturbance.on_seconds:.0f} s of {seconds[name]:.0f} s", flush=True)
        model = build_model("mobilenet_v1", alpha=args.alpha, resolution=args.resolution, classes=10)
        groups, rng = find_groups(model), np.random.default_rng(args.seed)
        variants = [specs_of(model)] + [
            specs_of(prune_to_counts(model, {g.id: int(rng.choice(channel_grid(g.size, args.step))) for g in groups}))
            for _ in range(args.variants - 1)
        ]
        estimates, entries = {}, {}
        for name, path in paths.items():
            with LatencyTable.open(path) as table:
                estimator = LatencyEstimator(table)
                estimates[name] = [estimator.total_us(specs) for specs in variants]
                entries[name] = [estimator.entries_us(specs) for specs in variants]
                context = estimator.context
                print(f"{name:>12}: cache {context.cache_bytes / 2**20:.2f} MiB, {context.fetch_ns_per_byte:.4f} ns/byte; "
                      f"invocation {float(table.meta['invoke_overhead_us']):.3f} µs; entries moved "
                      f"{_times(table.reference_slope())} the reference between passes")
    quiet = estimates["quiet"]
    for name in ("monitored", "unmonitored"):
        errors = [abs(e / q - 1) for e, q in zip(estimates[name], quiet)]
        entry_errors = [abs(e / q - 1) for e, q in zip(entries[name], entries["quiet"])]
        estimates[name + "_errors"] = errors
        print(f"{name:>12}: median disagreement with the quiet LUT {statistics.median(errors):.2%}, "
              f"largest {max(errors):.2%} over {len(errors)} variants (entries alone: median "
              f"{statistics.median(entry_errors):.2%}); build {seconds[name]:.0f} s")
    ratio = statistics.median(estimates["unmonitored_errors"]) / max(statistics.median(estimates["monitored_errors"]), 1e-9)
    print(f"the unmonitored LUT disagrees {ratio:.1f}x as much as the monitored one (median); quiet build {seconds['quiet']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
