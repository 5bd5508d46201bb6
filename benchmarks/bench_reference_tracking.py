"""Does the conditions monitor's reference model move with the ops a LUT measures?

    python benchmarks/bench_reference_tracking.py [--rounds 40]

Measures the reference model, three LUT-like single ops (a 3×3 convolution, a 1×1
convolution of 1 MB of weights, a depthwise convolution) and two whole models (MobileNetV1
α=0.25 and α=0.5 at 32 px: 0.2 and 3.3 MB of weights) on this machine's CPU, interleaved
round by round, and prints each one's spread (max / min) and its correlation with the
reference, and its log–log slope on the reference over all rounds and over the rounds whose
reference is within the monitor's tolerance of its lowest (the entries a LUT keeps, which
`lut.table.on_quiet_scale` counts times quiet / reference, a slope of 1): on a VM whose speed
moves with its neighbours, the ops move with the reference, which is what lets the monitor
keep only entries measured between two quiet looks. Then the
reference measured right after a 1-op model and right after a 6 MB model: the same, so a big
entry does not make the look after it slow.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lut.models import build_model  # noqa: E402
from lut.spec import LayerSpec  # noqa: E402
from profiler.context import _branch_model  # noqa: E402
from profiler.convert import keras_to_tflite  # noqa: E402
from profiler.host import HostDevice  # noqa: E402
from profiler.monitor import MonitorPolicy, reference_model  # noqa: E402
from profiler.single_op import SingleOpFactory  # noqa: E402

TOLERANCE_PCT = MonitorPolicy.DEFAULTS["tolerance_pct"]  # the host monitor's


def _slope(reference: np.ndarray, op: np.ndarray) -> float:
    """How far an op moves, relatively, per relative move of the reference (NaN on fewer than 3 rounds)."""
    if len(reference) < 3 or np.ptp(np.log(reference)) == 0:
        return float("nan")
    return float(np.polyfit(np.log(reference), np.log(op), 1)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    factory, device = SingleOpFactory(), HostDevice()
    models = {
        "reference": reference_model(),
        "conv 3x3": factory.build(LayerSpec("conv2d", 16, 16, 32, 32, kernel=(3, 3))),
        "conv 1x1 1MB": factory.build(LayerSpec("conv2d", 4, 4, 512, 512)),
        "depthwise": factory.build(LayerSpec("depthwise_conv2d", 32, 32, 64, 64, kernel=(3, 3))),
        **{f"V1 a={alpha:g} 32px": keras_to_tflite(build_model("mobilenet_v1", alpha=alpha, resolution=32, classes=10))
           for alpha in (0.25, 0.5)},
    }
    rows = [{name: r.median_us for name, r in device.measure(list(models.items()))} for _ in range(args.rounds)]
    table = np.array([[row[name] for name in models] for row in rows])
    correlation = np.corrcoef(table.T)[0]
    print(f"{args.rounds} interleaved rounds on {device.fingerprint()['cpu_model']}")
    reference = table[:, 0]
    band = reference <= reference.min() * (1 + TOLERANCE_PCT / 100)
    print(f"  rounds with the reference within +{TOLERANCE_PCT:g}% of its lowest (what the monitor keeps): {band.sum()}")
    for i, name in enumerate(models):
        column = table[:, i]
        print(f"  {name:15s} median {np.median(column):7.1f} µs, min {column.min():7.1f}, max {column.max():7.1f} "
              f"(spread {column.max() / column.min():.2f}), correlation with the reference {correlation[i]:.2f}")
        if i:
            print(f"  {'':15s} log-log slope on the reference {_slope(reference, column):.2f}; within the band "
                  f"{_slope(reference[band], column[band]):.2f} (what `lut.table.on_quiet_scale` assumes: 1)")
    small, big = models["conv 3x3"], _branch_model(24)
    after: dict[str, list[float]] = {"a 1-op model": [], "a 6 MB model": []}
    for _ in range(args.rounds // 2):
        for name, model in (("a 1-op model", small), ("a 6 MB model", big)):
            results = dict(device.measure([("before", model), ("reference", models["reference"])]))
            after[name].append(results["reference"].median_us)  # type: ignore[union-attr]
    for name, values in after.items():
        print(f"  the reference right after {name}: median {statistics.median(values):.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
