"""Build the full step-8 host LUT of MobileNetV1 α=0.5 at 128 px, and time it.

    python benchmarks/bench_lut_build.py [--alpha 0.5] [--resolution 128] [--naive-sample 40] [--dtype int8]

Prints entries/min split into single-op model generation and measuring, and next to it
the naive generation (one TFLiteConverter call per entry), timed in the same run on a
random sample of the same entries (converting all of them the naive way would take the
better part of an hour).  Targets: the whole LUT in under 10 minutes on a 2-core machine,
generation at least 10x faster than the naive way, float32 and int8 (`--dtype int8`: full-integer
single-op models; the naive way converts each with representative data, which takes longer still).
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from lut.models import build_model  # noqa: E402
from profiler.build_lut import build_lut, open_lut  # noqa: E402
from profiler.devices import open_device  # noqa: E402
from profiler.plan import plan_specs  # noqa: E402
from profiler.single_op import naive_single_op_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--naive-sample", type=int, default=40, help="entries converted the naive way")
    parser.add_argument("--dtype", choices=("float32", "int8"), default="float32", help="what the ops compute in")
    parser.add_argument("--out", help="keep the LUT here (default: a temporary file)")
    args = parser.parse_args()

    model = build_model("mobilenet_v1", alpha=args.alpha, resolution=args.resolution, classes=1000)
    specs = plan_specs([model], args.step, args.dtype)
    device = open_device("host")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or os.path.join(tmp, "bench.sqlite")
        with open_lut(path, device, args.step, args.dtype) as table:
            summary = build_lut(device, specs, table)
    sample = random.Random(0).sample(specs, min(args.naive_sample, len(specs)))
    start = time.perf_counter()
    for spec in sample:
        naive_single_op_model(spec)
    naive_s_per_entry = (time.perf_counter() - start) / len(sample)
    fast_s_per_entry = summary.generate_s / max(summary.measured + summary.failed, 1)

    n = summary.measured + summary.failed
    print(f"MobileNetV1 α={args.alpha} {args.resolution}px step {args.step} {args.dtype}: {len(specs)} entries, "
          f"{summary.failed} failed")
    print(f"whole LUT:   {summary.total_s / 60:6.2f} min  ({n / summary.total_s * 60:7.0f} entries/min)   target < 10 min")
    print(f"generating:  {summary.generate_s:6.1f} s    ({n / summary.generate_s * 60:7.0f} entries/min)  "
          f"{1000 * fast_s_per_entry:.2f} ms/entry")
    print(f"measuring:   {summary.measure_s:6.1f} s    ({n / summary.measure_s * 60:7.0f} entries/min)")
    print(f"naive generation (one TFLiteConverter call per entry, {len(sample)} sampled): {1000 * naive_s_per_entry:.0f} ms/entry")
    print(f"generation speed-up over naive: {naive_s_per_entry / fast_s_per_entry:.0f}x   target >= 10x")


if __name__ == "__main__":
    main()
