"""How well the LUT's interpolation rule predicts entries it did not measure, live on this CPU.

    .venv/bin/python benchmarks/bench_interpolation.py [--save tests/data/conv_family_host.json]

Measures one conv family (16×16 input, 1×1, ReLU6) on a step-8 grid of (cin, cout) from 16
to 96 under the conditions monitor, keeps the step-16 grid as the LUT, predicts the other
85 entries with the rule of `lut.latency` (linear in cin, the top of the tile in cout) and
with plain bilinear interpolation, and prints both rules' median and 90th-percentile
errors in the same run. `--save` records the measurements: `tests/test_estimate.py` checks
the rule on that recording, so the test needs no quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from lut.spec import LayerSpec  # noqa: E402

FAMILY = LayerSpec("conv2d", 16, 16, 8, 8, activation="relu6")
GRID = range(16, 97, 8)


def held_out_errors(measured: dict[tuple[int, int], float]) -> tuple[list[float], list[float]]:
    """Relative errors of the tile rule and of bilinear interpolation on the off-grid entries."""
    import tempfile

    from lut.latency import LatencyEstimator
    from lut.table import LatencyTable, Measurement

    def m(us):
        return Measurement(us, us, us, us, 0.0, 1)

    on_grid = {k: v for k, v in measured.items() if k[0] % 16 == 0 and k[1] % 16 == 0}
    with tempfile.TemporaryDirectory() as tmp, LatencyTable.create(
        f"{tmp}/lut.sqlite", {"device": "host", "backend": "cpu", "threads": 1, "delegate": "xnnpack", "flags": ""}
    ) as table:
        table.record_many((FAMILY.replace(cin=a, cout=b), m(us)) for (a, b), us in on_grid.items())
        estimator = LatencyEstimator(table)
        rule, bilinear = [], []
        for (a, b), us in measured.items():
            if (a, b) in on_grid:
                continue
            rule.append(abs(estimator.spec_us(FAMILY.replace(cin=a, cout=b)) - us) / us)
            a0, b0 = a // 16 * 16, b // 16 * 16
            a1, b1 = min(a0 + 16, 96) if a % 16 else a0, min(b0 + 16, 96) if b % 16 else b0
            ta, tb = (a - a0) / 16 if a1 != a0 else 0.0, (b - b0) / 16 if b1 != b0 else 0.0
            value = ((1 - ta) * (1 - tb) * on_grid[a0, b0] + ta * (1 - tb) * on_grid[a1, b0]
                     + (1 - ta) * tb * on_grid[a0, b1] + ta * tb * on_grid[a1, b1])
            bilinear.append(abs(value - us) / us)
    return rule, bilinear


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", metavar="FILE", help="record the measurements as JSON (for tests/data/)")
    args = parser.parse_args()
    from profiler.host import HostDevice
    from profiler.monitor import ConditionsMonitor, MonitorPolicy
    from profiler.single_op import SingleOpFactory

    device, factory = HostDevice(), SingleOpFactory()
    monitor = ConditionsMonitor(device, MonitorPolicy(), load=device.load_probe(), log=print)
    specs = {(a, b): FAMILY.replace(cin=a, cout=b) for a in GRID for b in GRID}
    measured = {}
    for key, result, _ in monitor.measure((spec.key, factory.build(spec)) for spec in specs.values()):
        measured[LayerSpec.from_key(key).cin, LayerSpec.from_key(key).cout] = result.median_us
    rule, bilinear = held_out_errors(measured)
    print(f"{len(rule)} held-out entries: tile rule median {statistics.median(rule):.1%}, p90 {_p90(rule):.1%}; "
          f"bilinear median {statistics.median(bilinear):.1%}, p90 {_p90(bilinear):.1%} "
          f"(bilinear / rule: {statistics.median(bilinear) / statistics.median(rule):.1f}x); {monitor.summary()}")
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"family": FAMILY.key, "device": device.fingerprint(), "monitor": monitor.summary(),
                       "entries": [{"cin": a, "cout": b, "median_us": us} for (a, b), us in sorted(measured.items())]},
                      f, indent=1)
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
