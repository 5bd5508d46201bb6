"""Export adapted models to `.tflite`, measure them whole on a device, and score them.

The final check of an adaptation: the exported model runs on the device the LUT was
measured on, as one graph, timed longer than a LUT entry (a whole model varies more from
run to run than one op). Accuracy of the exported model is computed with LiteRT itself,
so a conversion problem shows as an accuracy gap, not only as a latency.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adapter.errors import AdapterError
from lut.litert import LiteRTMissingError, interpreter_class
from lut.table import Measurement, MeasurementFailure
from profiler.convert import keras_to_tflite
from profiler.devices import Device, open_device
from profiler.timing import TimingPolicy

__all__ = [
    "Deployment",
    "ModelMeasurement",
    "measure_models",
    "open_final_check_device",
    "representative_batches",
    "tflite_accuracy",
]

_HOST_FINAL_TIMING: dict[str, Any] = dict(warmup_runs=20, min_runs=200, min_seconds=1.0, max_seconds=5.0, stable_pct=0.5)


def representative_batches(x: np.ndarray, *, images: int = 256, batch_size: int = 32) -> list[np.ndarray]:
    """Model-ready image batches for int8 calibration (the first `images` of `x`)."""
    x = x[:images]
    return [x[start : start + batch_size] for start in range(0, len(x), batch_size)]


@dataclasses.dataclass(frozen=True)
class Deployment:
    """How the adapter converts models for the device: as the LUT's ops run, float32 or int8
    (full-integer with float input and output, calibrated on `calibration`: training images)."""

    dtype: str = "float32"
    calibration: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "int8"):
            raise AdapterError(f"`dtype` must be 'float32' or 'int8'. Received: dtype={self.dtype!r}.")
        if self.dtype == "int8" and not self.calibration:
            raise AdapterError("An int8 deployment needs calibration images (`representative_batches`).")

    @classmethod
    def for_lut(cls, dtype: str, x_train: np.ndarray) -> Deployment:
        """The deployment a LUT of `dtype` describes, calibrated (for any int8 export) on the first
        training images."""
        return cls(dtype, tuple(representative_batches(x_train)))

    def convert(self, model, dtype: str | None = None) -> bytes:
        """`model` converted as deployed (or as `dtype`, e.g. the float model beside an int8 one)."""
        dtype = dtype or self.dtype
        if dtype == "int8" and not self.calibration:
            raise AdapterError("An int8 export needs calibration images; this deployment has none (`Deployment.for_lut`).")
        try:
            return keras_to_tflite(model, representative_data=list(self.calibration) if dtype == "int8" else None)
        except Exception as e:  # the converter raises many types (ConverterError, ValueError, RuntimeError)
            raise AdapterError(f"Could not convert {model.name} to .tflite: {e}") from e

    def export(self, model, path: str | Path, dtype: str | None = None) -> bytes:
        """`convert`, written to `path`."""
        tflite = self.convert(model, dtype)
        Path(path).write_bytes(tflite)
        return tflite


def open_final_check_device(name: str, *, backend: str, threads: int, devices_file: str | None = None) -> Device:
    """The device that measures whole models: `name` with the host's longer timing (a phone's is its own)."""
    return open_device(name, backend=backend, threads=threads, devices_file=devices_file,
                       timing=TimingPolicy(**_HOST_FINAL_TIMING))


@dataclasses.dataclass(frozen=True)
class ModelMeasurement:
    """A whole model's latency on the device (median over `count` runs), or why it failed."""

    median_ms: float | None
    min_ms: float | None
    std_ms: float | None
    count: int
    error: str | None = None


def measure_models(device: Device, models: Mapping[str, bytes], *, repeats: int = 3) -> dict[str, ModelMeasurement]:
    """Measure each named `.tflite` `repeats` times, interleaved (so drift hits every model
    alike), and keep the repeat with the lowest median: background load only adds time."""
    best: dict[str, Measurement | MeasurementFailure] = {}
    for _ in range(repeats):
        for name, result in device.measure(list(models.items())):
            if isinstance(result, MeasurementFailure):
                best.setdefault(name, result)
                continue
            kept = best.get(name)
            if not isinstance(kept, Measurement) or result.median_us < kept.median_us:
                best[name] = result
    return {name: _as_ms(best.get(name)) for name in models}


def _as_ms(result) -> ModelMeasurement:
    if result is None or not hasattr(result, "median_us"):
        return ModelMeasurement(None, None, None, 0, getattr(result, "error", "no result"))
    return ModelMeasurement(result.median_us / 1000, result.min_us / 1000, result.std_us / 1000, result.count)


def _interpreter(tflite: bytes):
    try:
        interpreter = interpreter_class()(model_content=tflite, num_threads=1)
    except LiteRTMissingError as e:
        raise AdapterError(str(e)) from e
    interpreter.allocate_tensors()
    return interpreter


def _outputs(interpreter, x: np.ndarray) -> Iterator[np.ndarray]:
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    scale, zero = inp.get("quantization", (0.0, 0))
    for image in x:
        value = image[None]
        if np.issubdtype(inp["dtype"], np.integer) and scale:  # an integer-input model: quantize
            info = np.iinfo(inp["dtype"])
            value = np.clip(np.round(value / scale + zero), info.min, info.max)
        interpreter.set_tensor(inp["index"], value.astype(inp["dtype"]))
        interpreter.invoke()
        yield interpreter.get_tensor(out["index"])[0]


def tflite_accuracy(tflite: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a `.tflite` classifier on model-ready images, run by LiteRT."""
    if len(x) == 0 or len(x) != len(y):
        raise AdapterError(f"tflite_accuracy needs as many labels as images, at least one; received {len(x)} and {len(y)}.")
    interpreter = _interpreter(tflite)
    predictions = np.array([int(np.argmax(o)) for o in _outputs(interpreter, x)])
    return float(np.mean(predictions == y))
