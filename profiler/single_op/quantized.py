"""An int8 op's constants as the TFLite converter stores them in a full-integer model.

Weights are int8, symmetric (zero point 0), with one scale per output channel along the
tensor's quantized dimension where the template has one (convolutions), else one scale
(the converter's per-tensor fully-connected weights); a bias is int32 with the scale
input scale × weight scale of its channel, which TFLite checks when it prepares the op.
Integer constants that are not quantized (MEAN's axes, PAD's paddings, RESHAPE's shape)
stay as the recipe gives them.  The activations' scales stay the template's: they set the
requantization multipliers, which cost the same whatever their value.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lut.tflite_ops import tflite_schema
from profiler.single_op.recipes import Consts

__all__ = ["quantize_consts"]

_INT8_MAX = 127


def _quantization(tensor: Any) -> Any | None:
    """The tensor's quantization parameters, None where it has none."""
    q = tensor.quantization
    return q if q is not None and q.scale is not None and len(q.scale) else None


def _set_scales(tensor: Any, scales: np.ndarray, axis: int) -> None:
    q = tflite_schema().QuantizationParametersT()
    q.scale = [float(s) for s in np.asarray(scales, np.float32).ravel()]
    q.zeroPoint = [0] * len(q.scale)
    q.quantizedDimension = axis
    tensor.quantization = q


def _int8_weights(tensor: Any, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`values` as int8 and their scales, per channel like the template's quantization."""
    q = _quantization(tensor)
    axis = int(q.quantizedDimension) if q is not None else 0
    if q is not None and len(q.scale) > 1:
        others = tuple(d for d in range(values.ndim) if d != axis)
        scales = np.max(np.abs(values), axis=others) / _INT8_MAX
        shaped = np.expand_dims(scales, others)
    else:
        scales = np.asarray([np.max(np.abs(values)) / _INT8_MAX])
        shaped = scales.reshape((1,) * values.ndim)
    scales = np.maximum(scales, np.finfo(np.float32).tiny).astype(np.float32)
    weights = np.clip(np.rint(values / np.maximum(shaped, np.finfo(np.float32).tiny)), -_INT8_MAX, _INT8_MAX)
    _set_scales(tensor, scales, axis)
    return weights.astype(np.int8), scales


def quantize_consts(subgraph: Any, op: Any, consts: Consts) -> Consts:
    """`consts` (float weights and bias from the recipe) as the int8 op of `op` in `subgraph` stores
    them; sets the weight and bias tensors' quantization to match."""
    out: Consts = {}
    weight_scales: np.ndarray | None = None
    for slot in sorted(consts):
        values, tensor = consts[slot], subgraph.tensors[op.inputs[slot]]
        if values.dtype != np.float32:
            out[slot] = values  # an integer parameter, not a quantized value
        elif weight_scales is None:
            out[slot], weight_scales = _int8_weights(tensor, values)
        else:  # the bias follows the weights: int32 at input scale × weight scale
            input_scale = np.float32(subgraph.tensors[op.inputs[0]].quantization.scale[0])
            bias_scales = input_scale * np.broadcast_to(weight_scales, values.shape).astype(np.float32)
            info = np.iinfo(np.int32)
            out[slot] = np.clip(np.rint(values / bias_scales), info.min, info.max).astype(np.int32)
            _set_scales(tensor, bias_scales, 0)
    return out
