"""Estimate a model's latency on a LUT's device: the sum of its ops' LUT entries.

    python -m lut.estimate --lut luts/host-cpu-1t.sqlite runs/base.keras [--per-op]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lut.cli import ArgumentParser, run_command
from lut.errors import LutError
from lut.latency import LatencyEstimator, specs_of
from lut.quiet_tf import import_tensorflow_quietly
from lut.table import LatencyTable

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m lut.estimate",
        description="Estimate a model's latency on the LUT's device as the sum of its ops' LUT entries.",
    )
    parser.add_argument("--lut", required=True, help="LUT file made by profiler.build_lut")
    parser.add_argument("model", help="a .keras or .tflite file")
    parser.add_argument("--per-op", action="store_true", help="also print every op with its latency")
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: _estimate(args), on_interrupt="nothing was measured or written")


def _check_tflite(path: str) -> None:
    """A `.tflite` is a TFLite flatbuffer, whose identifier "TFL3" sits at byte 4: say what it is when not."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return  # specs_of says what is wrong with the path
    if head[4:8] != b"TFL3":
        raise LutError(
            f"{path} is not a TFLite model (it starts {head!r}); expected a .tflite flatbuffer "
            "as the TFLite converter writes it (identifier TFL3). Convert the model again, or pass its .keras file."
        )


def _estimate(args: argparse.Namespace) -> int:
    if str(args.model).endswith(".tflite"):
        _check_tflite(args.model)
    import_tensorflow_quietly()
    with LatencyTable.open(args.lut) as table:
        estimator = LatencyEstimator(table)
        specs = specs_of(args.model, table.dtype)  # a Keras model as converted for the LUT
        if args.per_op:
            for spec in specs:
                print(f"{estimator.spec_us(spec):10.1f} us  {spec.key}")
        print(f"{estimator.total_us(specs) / 1000:.3f} ms  {args.model} on {table.meta.get('device')} ({len(specs)} ops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
