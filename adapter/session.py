"""What every search command opens before it searches, and how it measures the original.

A `Session` holds the LUT and its estimator, the devices (the LUT's, for on-demand entries,
and the final check's, for whole models), the conditions monitor, the base model and the
data. `adapter.adapt` (NetAdapt) and `adapter.baseline` (the width multiplier) each open one
from their arguments (`add_session_arguments` gives them the options they share), measure the
original with `measure_original`, run their search method, and hand the result to the final
check (`adapter.final_check`) and the report (`adapter.report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from adapter.errors import AdapterError
from adapter.export import Deployment, open_final_check_device
from adapter.final_check import LUT_TOLERANCE, ModelChecker
from adapter.latency import ensure_estimable, estimate_ms, model_specs
from adapter.train import SPLIT_SEED, TrainingRecord, record_path
from adapter.training.data import Dataset
from adapter.training.sources import load_dataset
from lut.cli import non_negative_int, positive_float, positive_int
from lut.latency import LatencyEstimator
from lut.models import load_model
from lut.spec import LutError
from lut.table import LatencyTable
from profiler.build_lut import open_monitor
from profiler.devices import Device, open_device
from profiler.errors import ProfilerError
from profiler.monitor import ConditionsMonitor, add_monitor_arguments, monitor_policy

_CALIBRATION_IMAGES = 256  # training images an int8 export is calibrated on

__all__ = [
    "Session",
    "add_check_arguments",
    "add_session_arguments",
    "check_holdout",
    "lut_fields",
    "measure_original",
    "model_checker",
    "open_session",
]


@dataclasses.dataclass(eq=False)
class Session:
    """What a search command opened: the LUT, the devices, the model, the data."""

    table: LatencyTable
    estimator: LatencyEstimator
    lut_device: Device | None  # measures missing LUT entries (the LUT's own timing), or None
    check_device: Device | None  # measures whole models (longer timing), or None
    device_name: str | None
    model: Any  # the base keras.Model
    data: Dataset
    monitor: ConditionsMonitor | None = None  # the conditions monitor on lut_device, with the LUT's quiet reference
    lut_tolerance: float = LUT_TOLERANCE
    deployment: Deployment = Deployment()  # how models are converted for the device: as the LUT's ops


def add_session_arguments(parser: argparse.ArgumentParser, *, holdout_default: int) -> None:
    """The options every search command takes: model, LUT, budget, data, output, devices, seed."""
    add = parser.add_argument
    add("--model", required=True, help="the trained base model (.keras, e.g. from python -m adapter.train)")
    add("--lut", required=True, help="the device's LUT (python -m profiler.build_lut)")
    add("--budget", required=True,
        help="latency budget: a fraction of the original's latency (0.5, or 50%%) or milliseconds (12ms); "
             "measured on the device when it is reachable (the LUT's terms are calibrated by the original's "
             "measurement), else estimated")
    add("--data", default="fashion_mnist",
        help="'fashion_mnist', an image folder or an .npz (as for adapter.train) (default: %(default)s)")
    add("--out", required=True, help="output folder")
    add("--device",
        help="device that measures missing LUT entries and the final model (default: the LUT's device, when reachable)")
    add("--devices", metavar="FILE", help="devices.toml registry for phones")
    add("--holdout", type=positive_int, default=holdout_default,
        help="holdout images that rank proposals (from the training data) (default: %(default)s)")
    add("--seed", type=non_negative_int, default=0, help="seed for sampling and initialisation (default: %(default)s)")


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The conditions monitor's options and how far the LUT and the device may disagree (after the
    search method's own options, where `--help` has always listed them)."""
    add_monitor_arguments(parser)
    parser.add_argument(
        "--lut-tolerance", type=positive_float, default=100 * LUT_TOLERANCE, metavar="PCT",
        help="how far the LUT's estimate of the original and its measurement may differ before the command stops "
             "(default: %(default)g)")


def _open_lut(path: str) -> tuple[LatencyTable, LatencyEstimator]:
    try:
        table = LatencyTable.open(path)
        return table, LatencyEstimator(table)
    except LutError as e:
        raise AdapterError(str(e)) from e
    except ValueError as e:  # a row whose key does not parse
        raise AdapterError(f"{path} is a malformed LUT: {e}") from e


def _open_devices(args: argparse.Namespace, meta: dict[str, str]) -> tuple[Device | None, Device | None, str | None]:
    """The devices for on-demand LUT entries and for the final check; (None, None) when the
    LUT's device is not reachable and none was asked for."""
    name = args.device or meta.get("device")
    backend, threads_text = meta.get("backend", "cpu"), meta.get("threads", "1")
    if not threads_text.isdigit():
        raise AdapterError(
            f"The LUT {args.lut} is malformed: its meta says threads={threads_text!r}; expected an integer."
        )
    if name is None:  # a LUT that names no device, and no --device: as for an unreachable one
        print(f"warning: the LUT {args.lut} names no device; nothing will be measured", file=sys.stderr)
        return None, None, None
    threads = int(threads_text)
    try:
        lut_device = open_device(name, backend=backend, threads=threads, devices_file=args.devices)
        check = lut_device if name != "host" else open_final_check_device(name, backend=backend, threads=threads)
    except ProfilerError as e:
        if args.device:
            raise AdapterError(f"Cannot use device {name!r}: {e}") from e
        print(f"warning: the LUT's device {name!r} is not reachable ({e}); nothing will be measured", file=sys.stderr)
        return None, None, None
    wanted = {k: meta.get(k) for k in ("device", "backend", "threads", "delegate")}
    have = {k: str(v) for k, v in lut_device.conditions().items() if k in wanted}
    if any(wanted[k] is not None and wanted[k] != have.get(k) for k in wanted):
        raise AdapterError(
            f"The LUT {args.lut} was measured under {wanted}; device {name!r} measures under {have}. "
            "Use the LUT's device, or a LUT built on this one."
        )
    return lut_device, check, name


def check_holdout(model: str, holdout: int) -> None:
    """Refuse a holdout larger than the one the base model (`adapter.train`'s record beside it) was
    not trained on: the splits nest, so the extra images would be ones it learned."""
    record = record_path(model)
    unseen = TrainingRecord.load(record).holdout if record.is_file() else None
    if unseen is not None and holdout > unseen:
        raise AdapterError(
            f"--holdout {holdout} is larger than the {unseen} images the base model "
            f"was not trained on ({record}); rank on unseen images: use --holdout ≤ that."
        )


def open_session(args: argparse.Namespace, *, check_model: Any = None) -> Session:
    """Open the LUT, the model, the devices (with the conditions monitor) and the data of `args`.

    `check_model(model)`, when given, checks what the command needs of the model before any
    device is opened or data loaded (a bad width-multiplier grid fails now, not after a search).
    """
    for what, path in (("--model", args.model), ("--lut", args.lut)):
        if not Path(path).is_file():
            raise AdapterError(f"{what} {path} does not exist.")
    table, estimator = _open_lut(args.lut)
    model = load_model(args.model)
    if check_model is not None:
        check_model(model)
    check_holdout(args.model, args.holdout)
    lut_device, check_device, device_name = _open_devices(args, table.meta)
    monitor = None
    if lut_device is not None:
        monitor = open_monitor(lut_device, table, monitor_policy(args), log=lambda message: print(message, flush=True))
    # the original is estimated before any search: what the LUT lacks of it is measured now
    ensure_estimable(estimator, model_specs(estimator, model), lut_device, policy=monitor_policy(args),
                     log=lambda line: print(line, flush=True))
    print(f"loading {args.data} at {model.input_shape[1]} px", flush=True)
    data = load_dataset(args.data, resolution=int(model.input_shape[1]), holdout=args.holdout, seed=SPLIT_SEED)
    deployment = Deployment.for_lut(table.dtype, data.train.take(min(_CALIBRATION_IMAGES, len(data.train))).arrays()[0])
    if deployment.dtype != "float32":
        print(f"the LUT is {deployment.dtype}: models are measured and exported as {deployment.dtype} "
              f"(calibrated on {_CALIBRATION_IMAGES} training images), the float model beside it", flush=True)
    return Session(table, estimator, lut_device, check_device, device_name, model, data, monitor,
                   args.lut_tolerance / 100, deployment)


def model_checker(session: Session, out: Path) -> ModelChecker | None:
    """The final-check device's `ModelChecker` against the original (None without a device)."""
    if session.check_device is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    original = session.deployment.export(session.model, out / "original.tflite")
    return ModelChecker(session.check_device, session.monitor, original, out, lut_tolerance=session.lut_tolerance,
                        deployment=session.deployment)


def measure_original(session: Session, checker: ModelChecker | None) -> float | None:
    """The original's latency on the final-check device (None without one), after checking that
    the LUT and the device agree on it (`ModelChecker.original_ms`)."""
    if checker is None:
        return None
    measured = checker.original_ms(estimate_ms(session.estimator, session.model))
    print(f"the original measures {measured:.4g} ms on {session.device_name}", flush=True)
    return measured


def lut_fields(path: str, table: LatencyTable, step: int) -> dict[str, Any]:
    """The LUT as the report names it."""
    meta = table.meta
    return {"path": path, "device": meta.get("device"), "backend": meta.get("backend"),
            "threads": meta.get("threads"), "dtype": table.dtype, "step": step}
