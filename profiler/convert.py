"""Keras → `.tflite` the way phonefit deploys models: float32, batch fixed to 1."""
from __future__ import annotations

import contextlib
import io

__all__ = ["keras_to_tflite"]


def keras_to_tflite(model, *, representative_data=None) -> bytes:
    """Convert `model` with its batch dimension fixed to 1.

    A fixed batch lets the converter fold the shape arithmetic a dynamic batch needs
    (SHAPE/STRIDED_SLICE/PACK before every Reshape), so the `.tflite` runs only the ops
    a phone runs for the layers.  With `representative_data` (an iterable of input
    batches) the model is quantized to int8 with float input and output.
    """
    import keras
    import tensorflow as tf

    inputs = [keras.Input(batch_shape=(1, *t.shape[1:]), dtype=t.dtype) for t in model.inputs]
    inputs = inputs[0] if len(inputs) == 1 else inputs
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, model(inputs)))
    if representative_data is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

        def _representative():
            for batch in representative_data:
                for i in range(len(batch)):
                    yield [tf.cast(batch[i : i + 1], tf.float32)]

        converter.representative_dataset = _representative
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints every SavedModel it exports
        return converter.convert()
