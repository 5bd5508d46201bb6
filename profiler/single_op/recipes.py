"""What each op kind is made of: its Keras layers, op tensor shapes, constant inputs and the
rules a `LayerSpec` must meet to be built (one `Recipe` per op, in one table), and the small
template spec a spec is converted from."""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any, TypeAlias

import numpy as np

from lut.spec import CHANNEL_PRESERVING_OPS, LayerSpec
from profiler.errors import ProfilerError

__all__ = ["RECIPES", "Consts", "Recipe", "check_spec", "spec_rng", "template_spec"]

_TEMPLATE_CHANNELS = 2
_TEMPLATE_SIZE = 4
_WEIGHT_SCALE = 0.1
_MIN_MAGNITUDE = 1e-4

Consts: TypeAlias = dict[int, np.ndarray]  # op input slot -> constant values, TFLite layout
Keras: TypeAlias = Any  # the `keras` module (imported by the caller: TensorFlow is slow to import)
KerasLayer: TypeAlias = Any  # Keras ships no type information


# ---- what each op is made of ------------------------------------------------------------


def _flat_or_nhwc(spec: LayerSpec) -> tuple[int, ...]:
    """A 2-D `[1, c]` tensor for `h = w = 1` (a classifier's output), else NHWC."""
    return (1, spec.cin) if spec.h == spec.w == 1 else (1, spec.h, spec.w, spec.cin)


def _nhwc_in(spec: LayerSpec) -> tuple[int, ...]:
    return (1, spec.h, spec.w, spec.cin)


def _nhwc_out(spec: LayerSpec) -> tuple[int, ...]:
    return (1, *spec.output_hw, spec.cout)


def _random(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= _WEIGHT_SCALE
    return np.copysign(np.maximum(np.abs(values), np.float32(_MIN_MAGNITUDE)), values)


def _filter_consts(shape: Callable[[LayerSpec], tuple[int, ...]]) -> Callable[[LayerSpec, np.random.Generator], Consts]:
    def consts(spec: LayerSpec, rng: np.random.Generator) -> Consts:
        return {1: _random(rng, shape(spec)), 2: _random(rng, (spec.cout,))}

    return consts


def _int32_const(values: Callable[[LayerSpec], list[Any]]) -> Callable[[LayerSpec, np.random.Generator], Consts]:
    def consts(spec: LayerSpec, rng: np.random.Generator) -> Consts:
        return {1: np.asarray(values(spec), dtype=np.int32)}

    return consts


def _no_consts(spec: LayerSpec, rng: np.random.Generator) -> Consts:
    return {}


def _filter_to_keras(consts: Consts) -> list[np.ndarray]:
    # TFLite [cout, kh, kw, cin] (conv) / [1, kh, kw, c] (depthwise) -> Keras [kh, kw, cin, cout] / [kh, kw, c, 1]
    return [consts[1].transpose(1, 2, 3, 0), consts[2]]


def _dense_to_keras(consts: Consts) -> list[np.ndarray]:
    return [consts[1].T, consts[2]]  # TFLite [units, in] -> Keras [in, units]


def _keras_activation(spec: LayerSpec) -> str | None:
    return None if spec.activation == "none" else spec.activation


def _conv_layers(spec: LayerSpec, keras: Keras) -> list[KerasLayer]:
    window = {"strides": spec.stride, "padding": spec.padding, "activation": _keras_activation(spec)}
    if spec.op == "conv2d":
        return [keras.layers.Conv2D(spec.cout, spec.kernel, **window)]
    return [keras.layers.DepthwiseConv2D(spec.kernel, depth_multiplier=1, **window)]


def _pool_layers(spec: LayerSpec, keras: Keras) -> list[KerasLayer]:
    pool = keras.layers.AveragePooling2D if spec.op == "average_pool_2d" else keras.layers.MaxPooling2D
    return [pool(spec.kernel, strides=spec.stride, padding=spec.padding), *_activation_layers(spec, keras)]


def _activation_layers(spec: LayerSpec, keras: Keras) -> list[KerasLayer]:
    return [] if spec.activation == "none" else [keras.layers.Activation(spec.activation)]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one op kind is built: Keras layers, op tensor shapes, constant inputs, spec rules."""

    opcode: str
    keras_layers: Callable[[LayerSpec, Keras], list[KerasLayer]]  # layers applied in order to the graph inputs
    input_shapes: Callable[[LayerSpec], list[tuple[int, ...]]]  # every op input, constants included
    output_shape: Callable[[LayerSpec], tuple[int, ...]]
    graph_inputs: int  # how many leading op inputs are model inputs (the rest are constants)
    consts: Callable[[LayerSpec, np.random.Generator], Consts] = _no_consts  # (spec, rng) -> constants
    to_keras: Callable[[Consts], list[np.ndarray]] | None = None  # consts -> weights of keras_layers(...)[0]
    windowed: bool = False  # kernel/stride/padding describe the op
    activations: tuple[str, ...] = ("none",)  # what the converter fuses into this op
    # The op of an int8 model converted with float input and output that is this one (its index);
    # None: the op is the whole model converted with int8 input and output.
    keep: int | None = None


_FUSED = ("none", "relu", "relu6")


def _pool_recipe(opcode: str) -> Recipe:
    """A pooling op: one windowed input, no constants, an activation fused."""
    return Recipe(opcode=opcode, keras_layers=_pool_layers, input_shapes=lambda s: [_nhwc_in(s)],
                  output_shape=_nhwc_out, graph_inputs=1, windowed=True, activations=_FUSED)


def _elementwise_recipe(opcode: str, keep: int | None = None) -> Recipe:
    """An op of one [1, c] or NHWC input, no constants, built from a Keras softmax (see `keep`)."""
    return Recipe(opcode=opcode, keras_layers=lambda s, keras: [keras.layers.Softmax()],
                  input_shapes=lambda s: [_flat_or_nhwc(s)], output_shape=_flat_or_nhwc, graph_inputs=1, keep=keep)


RECIPES: dict[str, Recipe] = {
    "conv2d": Recipe(
        opcode="CONV_2D",
        keras_layers=_conv_layers,
        input_shapes=lambda s: [_nhwc_in(s), (s.cout, *s.kernel, s.cin), (s.cout,)],
        output_shape=_nhwc_out,
        graph_inputs=1,
        consts=_filter_consts(lambda s: (s.cout, *s.kernel, s.cin)),
        to_keras=_filter_to_keras,
        windowed=True,
        activations=_FUSED,
    ),
    "depthwise_conv2d": Recipe(
        opcode="DEPTHWISE_CONV_2D",
        keras_layers=_conv_layers,
        input_shapes=lambda s: [_nhwc_in(s), (1, *s.kernel, s.cout), (s.cout,)],
        output_shape=_nhwc_out,
        graph_inputs=1,
        consts=_filter_consts(lambda s: (1, *s.kernel, s.cout)),
        to_keras=_filter_to_keras,
        windowed=True,
        activations=_FUSED,
    ),
    "fully_connected": Recipe(
        opcode="FULLY_CONNECTED",
        keras_layers=lambda s, keras: [keras.layers.Dense(s.cout, activation=_keras_activation(s))],
        input_shapes=lambda s: [(1, s.cin), (s.cout, s.cin), (s.cout,)],
        output_shape=lambda s: (1, s.cout),
        graph_inputs=1,
        consts=_filter_consts(lambda s: (s.cout, s.cin)),
        to_keras=_dense_to_keras,
        activations=_FUSED,
    ),
    "add": Recipe(
        opcode="ADD",
        keras_layers=lambda s, keras: [keras.layers.Add(), *_activation_layers(s, keras)],
        input_shapes=lambda s: [_nhwc_in(s)] * 2,
        output_shape=_nhwc_in,
        graph_inputs=2,
        activations=_FUSED,
    ),
    "mean": Recipe(
        opcode="MEAN",
        # LayerSpec has no keepDims (MobileNetV1 keeps them, V2 does not); the host times both alike.
        keras_layers=lambda s, keras: [keras.layers.GlobalAveragePooling2D(keepdims=False)],
        input_shapes=lambda s: [_nhwc_in(s), (2,)],
        output_shape=lambda s: (1, s.cout),
        graph_inputs=1,
        consts=_int32_const(lambda s: [1, 2]),
    ),
    "average_pool_2d": _pool_recipe("AVERAGE_POOL_2D"),
    "max_pool_2d": _pool_recipe("MAX_POOL_2D"),
    "pad": Recipe(
        opcode="PAD",
        keras_layers=lambda s, keras: [keras.layers.ZeroPadding2D((s.pads[:2], s.pads[2:]))],
        input_shapes=lambda s: [_nhwc_in(s), (4, 2)],
        output_shape=_nhwc_out,
        graph_inputs=1,
        consts=_int32_const(lambda s: [[0, 0], list(s.pads[:2]), list(s.pads[2:]), [0, 0]]),
    ),
    "reshape": Recipe(
        opcode="RESHAPE",
        keras_layers=lambda s, keras: [keras.layers.Reshape((s.cout,))],
        input_shapes=lambda s: [_nhwc_in(s), (2,)],
        output_shape=lambda s: (1, s.cout),
        graph_inputs=1,
        consts=_int32_const(lambda s: [1, s.cout]),
    ),
    "softmax": _elementwise_recipe("SOFTMAX"),
    # No Keras layer converts to a QUANTIZE or DEQUANTIZE alone: they are the first and the last
    # op of an int8 softmax converted with float input and output (`keep`).
    "quantize": _elementwise_recipe("QUANTIZE", keep=0),
    "dequantize": _elementwise_recipe("DEQUANTIZE", keep=-1),
}


def check_spec(spec: LayerSpec) -> Recipe:
    """The recipe for `spec`, or a `ProfilerError` saying what about the spec cannot be built."""
    if not isinstance(spec, LayerSpec):
        raise ProfilerError(f"`spec` must be a lut.LayerSpec. Received: {type(spec).__name__}.")
    recipe = RECIPES.get(spec.op)
    if recipe is None:
        raise ProfilerError(
            f"No single-op model recipe for op {spec.op!r}. Supported ops: {', '.join(RECIPES)}. Received: spec={spec.key}."
        )
    problems = [problem for rule in _SPEC_RULES if (problem := rule(spec, recipe))]
    if problems:
        raise ProfilerError(f"Cannot build a single-op model for {spec.key}: {'; '.join(problems)}.")
    return recipe


def _rule_activation(spec: LayerSpec, recipe: Recipe) -> str | None:
    if spec.activation not in recipe.activations:
        return f"{spec.op} fuses no activation (expected activation='none', received {spec.activation!r})"
    return None


def _rule_window(spec: LayerSpec, recipe: Recipe) -> str | None:
    if recipe.windowed:
        if min(spec.output_hw) < 1:
            return f"a {spec.kernel[0]}x{spec.kernel[1]} valid window does not fit a {spec.h}x{spec.w} input"
        return None
    if (spec.kernel, spec.stride, spec.padding) != ((1, 1), (1, 1), "valid"):
        return (
            f"{spec.op} has no window (expected kernel (1, 1), stride (1, 1), padding 'valid'; "
            f"received {spec.kernel}, {spec.stride}, {spec.padding!r})"
        )
    return None


def _rule_channels(spec: LayerSpec, recipe: Recipe) -> str | None:
    if spec.op == "reshape" and spec.cout != spec.h * spec.w * spec.cin:
        return f"a reshape flattens its input (expected cout == h*w*cin == {spec.h * spec.w * spec.cin}, received {spec.cout})"
    if spec.op == "fully_connected" and (spec.h, spec.w) != (1, 1):
        return f"fully_connected takes a flat input (expected h = w = 1, received {spec.h}x{spec.w}); flatten first"
    return None


def _rule_pads(spec: LayerSpec, recipe: Recipe) -> str | None:
    if spec.op == "pad" and (min(spec.pads) < 0 or not any(spec.pads)):
        return f"a pad needs non-negative pads, not all zero (the converter drops those); received {spec.pads}"
    return None


_SPEC_RULES = (_rule_activation, _rule_window, _rule_channels, _rule_pads)


def template_spec(spec: LayerSpec, recipe: Recipe) -> LayerSpec:
    """The small spec whose converted model serves as the template for `spec`."""
    h = min(spec.h, max(_TEMPLATE_SIZE, spec.kernel[0]))
    w = min(spec.w, max(_TEMPLATE_SIZE, spec.kernel[1]))
    cin = min(spec.cin, _TEMPLATE_CHANNELS)
    cout = cin if spec.op in CHANNEL_PRESERVING_OPS else min(spec.cout, _TEMPLATE_CHANNELS)
    if spec.op == "reshape":
        cout = h * w * cin
    if spec.op == "fully_connected":
        h = w = 1
    if spec.op == "add":  # on one pixel the converter would flatten an operand: convert at 2x2
        h, w = max(h, 2), max(w, 2)
    return spec.replace(h=h, w=w, cin=cin, cout=cout)


def spec_rng(seed: int, spec: LayerSpec) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(spec.key.encode())])

