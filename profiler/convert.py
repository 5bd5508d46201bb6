"""Keras → `.tflite` the way phonefit deploys models: float32, batch fixed to 1."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

__all__ = ["convert_for", "keras_to_tflite", "random_calibration"]

_CALIBRATION_IMAGES = 8

KerasModel = Any  # keras.Model: Keras ships no type information


def keras_to_tflite(
    model: KerasModel, *, representative_data: Iterable[np.ndarray] | None = None, int8_io: bool = False
) -> bytes:
    """Convert `model` with its batch dimension fixed to 1.

    A fixed batch lets the converter fold the shape arithmetic a dynamic batch needs
    (SHAPE/STRIDED_SLICE/PACK before every Reshape), so the `.tflite` runs only the ops
    a phone runs for the layers.  With `representative_data` (an iterable of input
    batches) the model is quantized to int8 with float input and output, as phonefit
    deploys it; `int8_io` makes the input and output int8 too (no QUANTIZE/DEQUANTIZE: a
    single-op model of an op inside an int8 model).
    """
    if int8_io and representative_data is None:
        raise ValueError("`int8_io` needs `representative_data`: only an int8 model has int8 input and output.")
    # TensorFlow and Keras take seconds to import: only a conversion pays for them.
    import keras
    import tensorflow as tf

    inputs = [keras.Input(batch_shape=(1, *t.shape[1:]), dtype=t.dtype) for t in model.inputs]
    graph_inputs = inputs[0] if len(inputs) == 1 else inputs
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(graph_inputs, model(graph_inputs)))
    if representative_data is not None:
        batches = representative_data
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

        def _representative() -> Iterator[list[Any]]:
            for batch in batches:
                for i in range(len(batch)):
                    yield [tf.cast(batch[i : i + 1], tf.float32)]

        converter.representative_dataset = _representative
        if int8_io:
            converter.inference_input_type = converter.inference_output_type = tf.int8
    # Keras prints every SavedModel it exports; the quantizer prints its settings from C++ to
    # standard error and warns that int8 inputs come without statistics (they need none).
    # Errors still reach the caller: the converter raises them, message included.
    quiet_native = _native_stderr_silenced() if representative_data is not None else contextlib.nullcontext()
    with contextlib.redirect_stdout(io.StringIO()), quiet_native, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        tflite: bytes = converter.convert()
    return tflite


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def random_calibration(model: KerasModel, seed: int = 0, images: int = _CALIBRATION_IMAGES) -> list[np.ndarray]:
    """One batch of random normal inputs for `model`: int8 calibration where no data is at hand
    (single-op models, random pruned variants). Activation ranges set the requantization
    multipliers, which cost the same whatever their value."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((images, *model.inputs[0].shape[1:])).astype(np.float32)]


def convert_for(model: KerasModel, dtype: str, representative_data: Iterable[np.ndarray] | None = None) -> bytes:
    """`model` as a `dtype` LUT's ops describe it: float32, or int8 with float input and output,
    calibrated on `representative_data` (`random_calibration` when None)."""
    if dtype == "float32":
        return keras_to_tflite(model)
    if dtype != "int8":
        raise ValueError(f"`dtype` must be 'float32' or 'int8'. Received: dtype={dtype!r}.")
    return keras_to_tflite(model, representative_data=representative_data or random_calibration(model))
