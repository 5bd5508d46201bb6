"""`specs_of(model)`: the LayerSpecs TFLite will run for a Keras model, without converting it.

The walk mirrors what the TFLite converter does to a functional model: BatchNormalization
folds into the conv/dense before it, ReLU/ReLU6 fuses into the conv/depthwise/dense/add
before it, Dropout disappears, a ZeroPadding2D that equals TensorFlow's SAME padding of the
valid convolution after it becomes that convolution's SAME padding.  Shapes are computed
here (not read from the built layers), so `out_channels` can ask for the specs of a pruned
variant without building it — the NetAdapt loop estimates thousands of those.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lut.keras_graph import as_functional, inbound_layers, layers_in_order, producer_of
from lut.spec import DTYPES, LayerSpec, LutError, UnsupportedLayerError

__all__ = ["channel_slopes", "specs_of_keras"]


@dataclasses.dataclass
class _Tensor:
    """What the walk knows of one layer output: its shape and the op that may absorb what follows."""

    shape: tuple[int, ...]  # (h, w, c) or (c,), batch excluded
    fusable: int | None = None  # index in `specs` of a conv/dense/add whose output this still is
    pads: tuple[int, int, int, int] | None = None  # a ZeroPadding2D not yet emitted


class _Walk:
    def __init__(self, model: Any, out_channels: Mapping[str, int]):
        self.model, self.out_channels = model, dict(out_channels)
        self.specs: list[LayerSpec] = []
        self.tensors: dict[str, _Tensor] = {}
        self.consumers: dict[str, int] = {}

    def emit(self, spec: LayerSpec, shape: tuple[int, ...], fusable: bool = False) -> _Tensor:
        self.specs.append(spec)
        return _Tensor(shape, len(self.specs) - 1 if fusable else None)

    def single_consumer(self, layer_name: str) -> bool:
        return self.consumers.get(layer_name, 0) == 1


def _config_activation(layer: Any) -> str:
    name = str(layer.get_config().get("activation", "linear"))
    return {"linear": "none", "relu": "relu", "relu6": "relu6"}.get(name, name)


def _spatial(t: _Tensor, layer: Any) -> tuple[int, int, int]:
    if len(t.shape) != 3:
        raise UnsupportedLayerError(
            f"Layer {layer.name!r} ({type(layer).__name__}) expects an (h, w, c) input. Received shape {t.shape}."
        )
    h, w, c = t.shape
    return h, w, c


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_then_window(
    walk: _Walk, t: _Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: str
) -> tuple[_Tensor, str]:
    """Absorb a pending ZeroPadding2D into a SAME window op, or emit it as a pad op."""
    if t.pads is None:
        return t, padding
    h, w, c = t.shape
    t0, b0, l0, r0 = t.pads
    unpadded = (h - t0 - b0, w - l0 - r0, c)
    same = _same_pads(unpadded[0], kernel[0], stride[0]) + _same_pads(unpadded[1], kernel[1], stride[1])
    if padding == "valid" and same == t.pads:
        return _Tensor(unpadded), "same"
    spec = LayerSpec("pad", unpadded[0], unpadded[1], c, c, pads=t.pads)
    return walk.emit(spec, t.shape), padding


def _window_out(h: int, w: int, kernel: tuple[int, ...], stride: tuple[int, ...], padding: str) -> tuple[int, int]:
    if padding == "same":
        return -(-h // stride[0]), -(-w // stride[1])
    return (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1


def _conv(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    cfg = layer.get_config()
    kernel, stride = tuple(cfg["kernel_size"]), tuple(cfg["strides"])
    if tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1) or cfg.get("groups", 1) != 1:
        raise UnsupportedLayerError(
            f"Layer {layer.name!r} (Conv2D) uses dilation or groups, which phonefit does not measure. "
            f"Received: dilation_rate={cfg.get('dilation_rate')}, groups={cfg.get('groups')}."
        )
    t, padding = _pad_then_window(walk, inputs[0], kernel, stride, cfg["padding"])
    h, w, cin = _spatial(t, layer)
    cout = walk.out_channels.get(layer.name, cfg["filters"])
    spec = LayerSpec("conv2d", h, w, cin, cout, kernel, stride, padding, _fusable_activation(layer))
    return walk.emit(spec, (*_window_out(h, w, kernel, stride, padding), cout), fusable=True)


def _depthwise(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    cfg = layer.get_config()
    kernel, stride = tuple(cfg["kernel_size"]), tuple(cfg["strides"])
    if cfg.get("depth_multiplier", 1) != 1 or tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1):
        raise UnsupportedLayerError(
            f"Layer {layer.name!r} (DepthwiseConv2D) must have depth_multiplier=1 and no dilation. "
            f"Received: depth_multiplier={cfg.get('depth_multiplier')}, dilation_rate={cfg.get('dilation_rate')}."
        )
    t, padding = _pad_then_window(walk, inputs[0], kernel, stride, cfg["padding"])
    h, w, c = _spatial(t, layer)
    spec = LayerSpec("depthwise_conv2d", h, w, c, c, kernel, stride, padding, _fusable_activation(layer))
    return walk.emit(spec, (*_window_out(h, w, kernel, stride, padding), c), fusable=True)


def _dense(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    (t,) = inputs
    if len(t.shape) != 1:
        raise UnsupportedLayerError(
            f"Layer {layer.name!r} (Dense) on a rank-{len(t.shape) + 1} input is not supported; "
            "add a Flatten or GlobalAveragePooling2D before it."
        )
    units = walk.out_channels.get(layer.name, layer.get_config()["units"])
    activation = _config_activation(layer)
    fused = activation if activation in ("relu", "relu6") else "none"
    out = walk.emit(LayerSpec("fully_connected", 1, 1, t.shape[0], units, activation=fused), (units,), True)
    if activation == "softmax":
        return walk.emit(LayerSpec("softmax", 1, 1, units, units), (units,))
    if activation not in ("none", "relu", "relu6"):
        raise _activation_error(layer, activation)
    return out


def _fusable_activation(layer: Any) -> str:
    activation = _config_activation(layer)
    if activation not in ("none", "relu", "relu6"):
        raise _activation_error(layer, activation)
    return activation


def _activation_error(layer: Any, activation: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"Layer {layer.name!r} ({type(layer).__name__}) uses activation {activation!r}; phonefit measures "
        "linear, relu, relu6 (fused) and softmax."
    )


def _batch_norm(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    (t,) = inputs
    producer = walk.specs[t.fusable] if t.fusable is not None else None
    if producer is None or producer.op == "add" or producer.activation != "none":
        raise UnsupportedLayerError(
            f"Layer {layer.name!r} (BatchNormalization) must directly follow a Conv2D, DepthwiseConv2D or "
            "Dense so that TFLite folds it; a standalone BatchNormalization is not supported."
        )
    return t


def _relu(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    (t,) = inputs
    cfg = layer.get_config()
    if type(layer).__name__ == "Activation":
        activation = _config_activation(layer)
        if activation == "softmax":
            return _softmax(walk, layer, inputs)
    elif cfg.get("negative_slope", 0.0) == 0.0 and cfg.get("threshold", 0.0) == 0.0 and cfg.get("max_value") in (None, 6.0):
        activation = "relu6" if cfg.get("max_value") == 6.0 else "relu"
    else:
        activation = f"ReLU({cfg})"
    if activation not in ("relu", "relu6"):
        raise _activation_error(layer, activation)
    if t.fusable is None or walk.specs[t.fusable].activation != "none":
        raise UnsupportedLayerError(
            f"Layer {layer.name!r} ({type(layer).__name__}) must directly follow a Conv2D, DepthwiseConv2D, "
            "Dense or Add (with its BatchNormalization) so that TFLite fuses it; a standalone activation is not supported."
        )
    walk.specs[t.fusable] = walk.specs[t.fusable].replace(activation=activation)
    return _Tensor(t.shape)


def _softmax(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    (t,) = inputs
    if len(t.shape) != 1:
        raise UnsupportedLayerError(f"Layer {layer.name!r} (softmax) must act on a flat (classes,) tensor. Received shape {t.shape}.")
    return walk.emit(LayerSpec("softmax", 1, 1, t.shape[0], t.shape[0]), t.shape)


def _add(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    shapes = {t.shape for t in inputs}
    if len(inputs) != 2 or len(shapes) != 1:
        raise UnsupportedLayerError(
            f"Layer {layer.name!r} (Add) must add two tensors of one shape. Received shapes {[t.shape for t in inputs]}."
        )
    h, w, c = _spatial(inputs[0], layer)
    if (h, w) == (1, 1):  # on one pixel the converter flattens one operand and broadcasts
        walk.emit(LayerSpec("reshape", 1, 1, c, c), (c,))
    return walk.emit(LayerSpec("add", h, w, c, c), (h, w, c), fusable=True)


def _global_average(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    h, w, c = _spatial(inputs[0], layer)
    keepdims = layer.get_config().get("keepdims", False)
    if (h, w) == (1, 1) and keepdims:  # averaging one pixel into the same shape: the converter drops it
        return _Tensor((1, 1, c))
    return walk.emit(LayerSpec("mean", h, w, c, c), (1, 1, c) if keepdims else (c,))


def _pool(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    cfg = layer.get_config()
    kernel = tuple(cfg["pool_size"])
    stride = tuple(cfg["strides"] or kernel)
    t, padding = _pad_then_window(walk, inputs[0], kernel, stride, cfg["padding"])
    h, w, c = _spatial(t, layer)
    op = "max_pool_2d" if "Max" in type(layer).__name__ else "average_pool_2d"
    return walk.emit(LayerSpec(op, h, w, c, c, kernel, stride, padding), (*_window_out(h, w, kernel, stride, padding), c))


def _zero_padding(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    (t,) = inputs
    h, w, c = _spatial(t, layer)
    (top, bottom), (left, right) = layer.get_config()["padding"]
    if t.pads is not None:  # two paddings in a row: emit the first
        t = _pad_then_window(walk, t, (1, 1), (1, 1), "same")[0]
        h, w, c = t.shape
    return _Tensor((h + top + bottom, w + left + right, c), pads=(top, bottom, left, right))


def _reshape_like(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    (t,) = inputs
    h, w, c = t.shape if len(t.shape) == 3 else (1, 1, t.shape[0])
    if type(layer).__name__ == "Flatten":
        out: tuple[int, ...] = (h * w * c,)
    else:
        target: tuple[int, ...] = tuple(layer.get_config()["target_shape"])
        if -1 not in target and _product(target) != h * w * c:
            # The target was written for the unpruned width; keep the channels last.
            target = (*target[:-1], h * w * c // max(_product(target[:-1]), 1))
        out = tuple(h * w * c // -_product(target) if d == -1 else d for d in target)
    if out == t.shape:
        return _Tensor(out)  # a no-op reshape: the converter drops it
    return walk.emit(LayerSpec("reshape", h, w, c, out[-1]), out)


def _product(values: Iterable[int]) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def _identity(walk: _Walk, layer: Any, inputs: list[_Tensor]) -> _Tensor:
    (t,) = inputs
    return _Tensor(t.shape)


_HANDLERS: dict[str, Callable[[_Walk, Any, list[_Tensor]], _Tensor]] = {
    "Conv2D": _conv,
    "DepthwiseConv2D": _depthwise,
    "Dense": _dense,
    "BatchNormalization": _batch_norm,
    "ReLU": _relu,
    "Activation": _relu,
    "Softmax": _softmax,
    "Add": _add,
    "GlobalAveragePooling2D": _global_average,
    "AveragePooling2D": _pool,
    "MaxPooling2D": _pool,
    "ZeroPadding2D": _zero_padding,
    "Reshape": _reshape_like,
    "Flatten": _reshape_like,
    "Dropout": _identity,
}


def specs_of_keras(model: Any, out_channels: Mapping[str, int] | None = None, *, dtype: str = "float32") -> list[LayerSpec]:
    """The specs of a functional (or Sequential) Keras model in execution order.

    `out_channels` maps Conv2D/Dense layer names to a different number of filters/units:
    the specs are those of the model pruned that way (channels propagate through
    depthwise, BN, add, pooling and reshape as in the pruned model).  With `dtype="int8"`
    they are those of the model converted to int8 with float input and output
    (`profiler.convert.keras_to_tflite` with representative data): every op int8, a
    QUANTIZE per input first and a DEQUANTIZE per output last.
    """
    if dtype not in DTYPES:
        raise LutError(f"`dtype` must be one of {', '.join(DTYPES)}. Received: dtype={dtype!r}.")
    model = as_functional(model)  # a Sequential is read as the functional model it is
    walk = _Walk(model, out_channels or {})
    layers = layers_in_order(model)
    for layer in layers:
        if type(layer).__name__ != "InputLayer":
            for parent in inbound_layers(layer):
                walk.consumers[parent.name] = walk.consumers.get(parent.name, 0) + 1
    for layer in layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            walk.tensors[layer.name] = _Tensor(tuple(int(d) for d in layer.output.shape[1:]))
            continue
        handler = _HANDLERS.get(kind)
        if handler is None:
            raise UnsupportedLayerError(
                f"Layer {layer.name!r} of class {kind} is not supported. Supported layers: {', '.join(sorted(_HANDLERS))}."
            )
        inputs = [walk.tensors[parent.name] for parent in inbound_layers(layer)]
        out = handler(walk, layer, inputs)
        if out.fusable is not None and not walk.single_consumer(layer.name):
            out = dataclasses.replace(out, fusable=None)  # TFLite cannot fuse into a shared output
        walk.tensors[layer.name] = out
    if dtype == "float32":
        return walk.specs
    quantize = [_elementwise("quantize", walk.tensors[producer_of(t).name].shape) for t in model.inputs]
    dequantize = [_elementwise("dequantize", walk.tensors[producer_of(t).name].shape) for t in model.outputs]
    return [*quantize, *(spec.replace(dtype=dtype) for spec in walk.specs), *dequantize]


def _elementwise(op: str, shape: tuple[int, ...]) -> LayerSpec:
    """An int8 QUANTIZE/DEQUANTIZE of a tensor of `shape`, (h, w, c) or (c,)."""
    h, w, c = shape if len(shape) == 3 else (1, 1, shape[-1])
    return LayerSpec(op, h, w, c, c, dtype="int8")


def channel_slopes(
    model: Any,
    shrunk: Mapping[str, Mapping[str, int]],
    specs_of: Callable[[Any, Mapping[str, int]], list[LayerSpec]] = specs_of_keras,
) -> tuple[list[LayerSpec], dict[str, list[tuple[int, int, int]]]]:
    """The specs of `model`, and how they follow each group's channel count.

    `shrunk` maps a group name to its layers' filter counts one filter smaller; the walk is
    run once with each group shrunk and compared spec by spec with the model's. A spec's
    channel fields are affine in a group's count (a direct consumer: slope 1; a Flatten
    before a Dense: slope H×W; a Concatenate adds an offset), so `(index, Δcin, Δcout)` per
    changed spec gives its specs at any count without walking the model again.
    """
    base = specs_of(model, {})
    slopes = {}
    for name, counts in shrunk.items():
        smaller = specs_of(model, counts)
        slopes[name] = [
            (i, a.cin - b.cin, a.cout - b.cout)
            for i, (a, b) in enumerate(zip(base, smaller, strict=True))
            if (a.cin, a.cout) != (b.cin, b.cout)
        ]
    return base, slopes
