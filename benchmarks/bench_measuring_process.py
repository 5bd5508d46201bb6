"""Does a process slow its own reference model by converting and measuring many models?

    python benchmarks/bench_measuring_process.py [--models 768] [--rounds 5]

The host measures in a LiteRT-only process of its own (`profiler.host_worker`); the naive way
is to time the interpreters in the process that converts the models with TensorFlow. This
converts `--models` distinct single-op models (conv2d, 4–16 px, 8–128 channels), then times
each of them both ways, in chunks of 10 as `build_lut` does, alternating the two so that both
see the same machine. Then it reads the reference model (a median of 21 timings) in `--rounds`
interleaved rounds of three: in this process (naive), in the measuring process that timed
the models, and in a fresh measuring process started for that look. It prints the medians and
the ratio of each to the fresh process's: a ratio over 1 is a slowdown of the process's own
making, which the conditions monitor would take for a disturbed machine.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lut.spec import LayerSpec  # noqa: E402
from lut.table import Measurement  # noqa: E402
from profiler.host import HostDevice  # noqa: E402
from profiler.host_worker import measure_one  # noqa: E402
from profiler.monitor import reference_model  # noqa: E402
from profiler.single_op import SingleOpFactory  # noqa: E402
from profiler.timing import TimingPolicy  # noqa: E402

POLICY = TimingPolicy()
LOOKS = 21


def _in_process(model: bytes) -> float:
    result = measure_one(model, 1, POLICY)
    assert isinstance(result, Measurement), result
    return result.median_us


def _in_worker(device: HostDevice, model: bytes) -> float:
    [(_, result)] = device.measure([("model", model)])
    assert isinstance(result, Measurement), result
    return result.median_us


def _look(device: HostDevice | None, reference: bytes) -> float:
    """The reference's median of `LOOKS` timings: in this process (no device), else in the device's."""
    return statistics.median(_in_process(reference) if device is None else _in_worker(device, reference)
                             for _ in range(LOOKS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    reference, factory = reference_model(), SingleOpFactory()
    grid = itertools.product((4, 8, 16), (1, 3), range(8, 129, 8), range(8, 129, 16))
    specs = [LayerSpec("conv2d", h, h, cin, cout, kernel=(k, k)) for h, k, cin, cout in itertools.islice(grid, args.models)]
    start = time.monotonic()
    models = [factory.build(spec) for spec in specs]
    print(f"converted {len(models)} single-op models in {time.monotonic() - start:.0f} s")
    worker = HostDevice(policy=POLICY)
    for i in range(0, len(models), 10):
        chunk = models[i:i + 10] + [reference]
        for model in chunk:
            _in_process(model)
        list(worker.measure([(str(n), model) for n, model in enumerate(chunk)]))
    print(f"measured each in this process and in the measuring process ({time.monotonic() - start:.0f} s in all)")
    looks: dict[str, list[float]] = {"this process (naive)": [], "the measuring process": [], "a fresh measuring process": []}
    for _ in range(args.rounds):
        looks["this process (naive)"].append(_look(None, reference))
        looks["the measuring process"].append(_look(worker, reference))
        fresh = HostDevice(policy=POLICY)
        looks["a fresh measuring process"].append(_look(fresh, reference))
        fresh.close()
    worker.close()
    base = statistics.median(looks["a fresh measuring process"])
    print(f"the reference, {args.rounds} interleaved rounds of a median of {LOOKS} timings each:")
    for name, values in looks.items():
        median = statistics.median(values)
        print(f"  in {name:26s} median {median:6.1f} µs (rounds {', '.join(f'{v:.0f}' for v in values)}), "
              f"{median / base:.3f}× the fresh process's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
