"""Single-op `.tflite` models: for each `LayerSpec`, a model whose one op is what the whole
converted model runs for that layer.

Converting a Keras model costs about 0.2 s, and a LUT needs thousands of these models.
`SingleOpFactory` therefore converts one small *template* per op configuration (the spec
with its channels shrunk to at most 2 and its spatial size to at most 4 — sizes up to 4
are kept exactly, because the converter treats 1×1 maps specially: it drops a MEAN over
one and turns an ADD of two into RESHAPE + broadcast ADD), checks that the converter made
exactly the expected op of it, keeps it unpacked in the TFLite schema's object API, and
for each spec rewrites the op's tensor shapes and constant buffers (weights, bias,
paddings, target shape) and packs it.  `naive_single_op_model` is the
one-conversion-per-spec reference; both give the same op (opcode, version, builtin
options, tensor shapes and dtypes) and, for one seed, the same weights; a factory's
models are byte-for-byte reproducible.

Weights are random normal × 0.1 with magnitudes of at least 1e-4 (no zeros, which the
converter would fold away in a bias, and no denormals, which some CPUs run slowly),
drawn from a generator seeded by `(seed, spec.key)` so a model depends only on them.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import zlib
from collections.abc import Callable

import numpy as np

from lut.spec import CHANNEL_PRESERVING_OPS, LayerSpec
from lut.tflite_ops import op_details, read_model, tflite_schema
from profiler import convert as _convert
from profiler.errors import ProfilerError

__all__ = ["SingleOpFactory", "keras_layers_for", "naive_single_op_model"]

_TEMPLATE_CHANNELS = 2
_TEMPLATE_SIZE = 4
_WEIGHT_SCALE = 0.1
_MIN_MAGNITUDE = 1e-4
_BUFFER_ALIGNMENT = 16  # what the converter uses for constant buffers
_FILE_IDENTIFIER = b"TFL3"


# ---- what each op is made of ------------------------------------------------------------


def _softmax_shape(spec: LayerSpec) -> tuple[int, ...]:
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


def _filter_consts(shape: Callable[[LayerSpec], tuple[int, ...]]):
    def consts(spec: LayerSpec, rng: np.random.Generator) -> dict[int, np.ndarray]:
        return {1: _random(rng, shape(spec)), 2: _random(rng, (spec.cout,))}

    return consts


def _int32_const(values: Callable[[LayerSpec], list]):
    def consts(spec: LayerSpec, rng: np.random.Generator) -> dict[int, np.ndarray]:
        return {1: np.asarray(values(spec), dtype=np.int32)}

    return consts


def _no_consts(spec: LayerSpec, rng: np.random.Generator) -> dict[int, np.ndarray]:
    return {}


def _filter_to_keras(consts: dict[int, np.ndarray]) -> list[np.ndarray]:
    # TFLite [cout, kh, kw, cin] (conv) / [1, kh, kw, c] (depthwise) -> Keras [kh, kw, cin, cout] / [kh, kw, c, 1]
    return [consts[1].transpose(1, 2, 3, 0), consts[2]]


def _dense_to_keras(consts: dict[int, np.ndarray]) -> list[np.ndarray]:
    return [consts[1].T, consts[2]]  # TFLite [units, in] -> Keras [in, units]


def _keras_activation(spec: LayerSpec) -> str | None:
    return None if spec.activation == "none" else spec.activation


def _conv_layers(spec: LayerSpec, keras) -> list:
    window = {"strides": spec.stride, "padding": spec.padding, "activation": _keras_activation(spec)}
    if spec.op == "conv2d":
        return [keras.layers.Conv2D(spec.cout, spec.kernel, **window)]
    return [keras.layers.DepthwiseConv2D(spec.kernel, depth_multiplier=1, **window)]


def _pool_layers(spec: LayerSpec, keras) -> list:
    pool = keras.layers.AveragePooling2D if spec.op == "average_pool_2d" else keras.layers.MaxPooling2D
    return [pool(spec.kernel, strides=spec.stride, padding=spec.padding), *_activation_layers(spec, keras)]


def _activation_layers(spec: LayerSpec, keras) -> list:
    return [] if spec.activation == "none" else [keras.layers.Activation(spec.activation)]


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How one op kind is built: Keras layers, op tensor shapes, constant inputs, spec rules."""

    opcode: str
    keras_layers: Callable  # (spec, keras) -> layers applied in order to the graph inputs
    input_shapes: Callable[[LayerSpec], list[tuple[int, ...]]]  # every op input, constants included
    output_shape: Callable[[LayerSpec], tuple[int, ...]]
    graph_inputs: int  # how many leading op inputs are model inputs (the rest are constants)
    consts: Callable = _no_consts  # (spec, rng) -> {op input slot: values, TFLite layout}
    to_keras: Callable | None = None  # consts -> weights of keras_layers(...)[0]
    windowed: bool = False  # kernel/stride/padding describe the op
    activations: tuple[str, ...] = ("none",)  # what the converter fuses into this op


_FUSED = ("none", "relu", "relu6")

_RECIPES: dict[str, _Recipe] = {
    "conv2d": _Recipe(
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
    "depthwise_conv2d": _Recipe(
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
    "fully_connected": _Recipe(
        opcode="FULLY_CONNECTED",
        keras_layers=lambda s, keras: [keras.layers.Dense(s.cout, activation=_keras_activation(s))],
        input_shapes=lambda s: [(1, s.cin), (s.cout, s.cin), (s.cout,)],
        output_shape=lambda s: (1, s.cout),
        graph_inputs=1,
        consts=_filter_consts(lambda s: (s.cout, s.cin)),
        to_keras=_dense_to_keras,
        activations=_FUSED,
    ),
    "add": _Recipe(
        opcode="ADD",
        keras_layers=lambda s, keras: [keras.layers.Add(), *_activation_layers(s, keras)],
        input_shapes=lambda s: [_nhwc_in(s)] * 2,
        output_shape=_nhwc_in,
        graph_inputs=2,
        activations=_FUSED,
    ),
    "mean": _Recipe(
        opcode="MEAN",
        # LayerSpec has no keepDims (MobileNetV1 keeps them, V2 does not); the host times both alike.
        keras_layers=lambda s, keras: [keras.layers.GlobalAveragePooling2D(keepdims=False)],
        input_shapes=lambda s: [_nhwc_in(s), (2,)],
        output_shape=lambda s: (1, s.cout),
        graph_inputs=1,
        consts=_int32_const(lambda s: [1, 2]),
    ),
    "average_pool_2d": _Recipe(
        opcode="AVERAGE_POOL_2D",
        keras_layers=_pool_layers,
        input_shapes=lambda s: [_nhwc_in(s)],
        output_shape=_nhwc_out,
        graph_inputs=1,
        windowed=True,
        activations=_FUSED,
    ),
    "max_pool_2d": _Recipe(
        opcode="MAX_POOL_2D",
        keras_layers=_pool_layers,
        input_shapes=lambda s: [_nhwc_in(s)],
        output_shape=_nhwc_out,
        graph_inputs=1,
        windowed=True,
        activations=_FUSED,
    ),
    "pad": _Recipe(
        opcode="PAD",
        keras_layers=lambda s, keras: [keras.layers.ZeroPadding2D((s.pads[:2], s.pads[2:]))],
        input_shapes=lambda s: [_nhwc_in(s), (4, 2)],
        output_shape=_nhwc_out,
        graph_inputs=1,
        consts=_int32_const(lambda s: [[0, 0], list(s.pads[:2]), list(s.pads[2:]), [0, 0]]),
    ),
    "reshape": _Recipe(
        opcode="RESHAPE",
        keras_layers=lambda s, keras: [keras.layers.Reshape((s.cout,))],
        input_shapes=lambda s: [_nhwc_in(s), (2,)],
        output_shape=lambda s: (1, s.cout),
        graph_inputs=1,
        consts=_int32_const(lambda s: [1, s.cout]),
    ),
    "softmax": _Recipe(
        opcode="SOFTMAX",
        keras_layers=lambda s, keras: [keras.layers.Softmax()],
        input_shapes=lambda s: [_softmax_shape(s)],
        output_shape=_softmax_shape,
        graph_inputs=1,
    ),
}


def _check_spec(spec: LayerSpec) -> _Recipe:
    """The recipe for `spec`, or a `ProfilerError` saying what about the spec cannot be built."""
    if not isinstance(spec, LayerSpec):
        raise ProfilerError(f"`spec` must be a lut.LayerSpec. Received: {type(spec).__name__}.")
    if spec.dtype != "float32":
        raise ProfilerError(
            f"Single-op models are float32 only; {spec.dtype} is not yet supported. Received: spec={spec.key}."
        )
    recipe = _RECIPES.get(spec.op)
    if recipe is None:
        raise ProfilerError(
            f"No single-op model recipe for op {spec.op!r}. Supported ops: {', '.join(_RECIPES)}. Received: spec={spec.key}."
        )
    problems = [problem for rule in _SPEC_RULES if (problem := rule(spec, recipe))]
    if problems:
        raise ProfilerError(f"Cannot build a single-op model for {spec.key}: {'; '.join(problems)}.")
    return recipe


def _rule_activation(spec: LayerSpec, recipe: _Recipe) -> str | None:
    if spec.activation not in recipe.activations:
        return f"{spec.op} fuses no activation (expected activation='none', received {spec.activation!r})"
    return None


def _rule_window(spec: LayerSpec, recipe: _Recipe) -> str | None:
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


def _rule_channels(spec: LayerSpec, recipe: _Recipe) -> str | None:
    if spec.op == "reshape" and spec.cout != spec.h * spec.w * spec.cin:
        return f"a reshape flattens its input (expected cout == h*w*cin == {spec.h * spec.w * spec.cin}, received {spec.cout})"
    if spec.op == "fully_connected" and (spec.h, spec.w) != (1, 1):
        return f"fully_connected takes a flat input (expected h = w = 1, received {spec.h}x{spec.w}); flatten first"
    return None


def _rule_pads(spec: LayerSpec, recipe: _Recipe) -> str | None:
    if spec.op == "pad" and (min(spec.pads) < 0 or not any(spec.pads)):
        return f"a pad needs non-negative pads, not all zero (the converter drops those); received {spec.pads}"
    return None


_SPEC_RULES = (_rule_activation, _rule_window, _rule_channels, _rule_pads)


def _template_spec(spec: LayerSpec, recipe: _Recipe) -> LayerSpec:
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


def _rng(seed: int, spec: LayerSpec) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(spec.key.encode())])


# ---- the naive way: one converter call per spec -----------------------------------------


def keras_layers_for(spec: LayerSpec) -> list:
    """The Keras layers that TFLite turns into the op of `spec`, applied in order to its input(s).

    `add` starts with `keras.layers.Add` (two inputs); an activation the op fuses is
    either the first layer's `activation` or a separate `Activation` layer after it.
    """
    recipe = _check_spec(spec)
    import keras

    return recipe.keras_layers(spec, keras)


def _keras_model(spec: LayerSpec, recipe: _Recipe, consts: dict[int, np.ndarray]):
    """A one-input Keras model of `spec`'s layers; a two-input op gets its one input twice."""
    import keras

    inputs = keras.Input(shape=recipe.input_shapes(spec)[0][1:], batch_size=1)
    layers = recipe.keras_layers(spec, keras)
    x = [inputs] * recipe.graph_inputs if recipe.graph_inputs > 1 else inputs
    for layer in layers:
        x = layer(x)
    model = keras.Model(inputs, x)
    if recipe.to_keras is not None:
        layers[0].set_weights(recipe.to_keras(consts))
    return model


def _separate_graph_inputs(converted: bytes, graph_inputs: int) -> bytes:
    """Give each of the op's first `graph_inputs` operands its own model input.

    `keras_to_tflite` converts one-input models, so an ADD is converted as `x + x`: one
    tensor feeding both operands.  In a whole model the operands are two tensors, so the
    second gets a copy of the first's tensor, listed as a model (and signature) input.
    """
    model = read_model(converted)
    subgraph = model.subgraphs[0]
    op = subgraph.operators[0]
    for slot in range(1, min(graph_inputs, len(op.inputs))):
        if op.inputs[slot] not in list(op.inputs[:slot]):
            continue
        subgraph.tensors.append(copy.deepcopy(subgraph.tensors[op.inputs[slot]]))
        index = len(subgraph.tensors) - 1
        op.inputs[slot] = index
        subgraph.inputs = [*subgraph.inputs, index]
        for signature in model.signatureDefs or ():
            signature.inputs.append(tflite_schema().TensorMapT(name=f"input_{slot}", tensorIndex=index))
    return _serialize(model, len(converted))


def naive_single_op_model(spec: LayerSpec, seed: int = 0) -> bytes:
    """`spec`'s single-op model made the slow way: Keras layers → `profiler.convert.keras_to_tflite`.

    Same op and weights as `SingleOpFactory(seed).build(spec)`.
    """
    recipe = _check_spec(spec)
    converted = _convert.keras_to_tflite(_keras_model(spec, recipe, recipe.consts(spec, _rng(seed, spec))))
    return converted if recipe.graph_inputs == 1 else _separate_graph_inputs(converted, recipe.graph_inputs)


# ---- the fast way: rewrite a converted template -----------------------------------------


@functools.cache
def _aligned_buffer_type() -> type:
    """`BufferT` that packs its bytes 16-byte aligned, as the converter does (the stock one aligns to 1)."""
    schema = tflite_schema()

    class AlignedBufferT(schema.BufferT):
        def Pack(self, builder):
            payload = self.data
            builder.StartVector(1, len(payload), _BUFFER_ALIGNMENT)
            builder.head -= len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            data = builder.EndVector()
            schema.BufferStart(builder)
            schema.BufferAddData(builder, data)
            return schema.BufferEnd(builder)

    return AlignedBufferT


def _set_shape(tensor, shape: tuple[int, ...]) -> None:
    tensor.shape = np.asarray(shape, dtype=np.int32)
    if tensor.shapeSignature is not None:
        tensor.shapeSignature = np.asarray(shape, dtype=np.int32)


def _rewrite(model, spec: LayerSpec, recipe: _Recipe, consts: dict[int, np.ndarray]) -> int:
    """Give the template's op `spec`'s shapes and `consts`; return the bytes of constants written."""
    subgraph = model.subgraphs[0]
    op = subgraph.operators[0]
    for slot, shape in enumerate(recipe.input_shapes(spec)):
        _set_shape(subgraph.tensors[op.inputs[slot]], shape)
    _set_shape(subgraph.tensors[op.outputs[0]], recipe.output_shape(spec))
    if getattr(op.builtinOptions, "newShape", None) is not None:  # RESHAPE may repeat its shape here
        op.builtinOptions.newShape = list(recipe.output_shape(spec))
    written = 0
    for slot, values in consts.items():
        payload = values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
        model.buffers[subgraph.tensors[op.inputs[slot]].buffer] = _aligned_buffer_type()(data=payload)
        written += values.nbytes
    return written


def _serialize(model, size_hint: int) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(size_hint + 4096)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def _template_problem(spec: LayerSpec, recipe: _Recipe, model: bytes) -> str | None:
    """Why the converted `model` is not a template `_rewrite` can use, or None."""
    ops = op_details(model)
    if [op["opcode"] for op in ops] != [recipe.opcode]:
        return f"made the ops {[op['opcode'] for op in ops]}"
    consts = [t is not None and t["const"] for t in ops[0]["inputs"]]
    expected = [slot >= recipe.graph_inputs for slot in range(len(recipe.input_shapes(spec)))]
    if consts != expected:
        return f"made a {recipe.opcode} whose inputs are constant as {consts}, expected {expected}"
    subgraph = read_model(model).subgraphs[0]
    operands = [int(i) for i in subgraph.operators[0].inputs]
    if sorted(operands[: recipe.graph_inputs]) != sorted(int(i) for i in subgraph.inputs):
        return f"made a {recipe.opcode} whose operands {operands} are not the model inputs {list(subgraph.inputs)}"
    buffers = [subgraph.tensors[i].buffer for i in operands[recipe.graph_inputs :]]
    if len(set(buffers)) != len(buffers):
        return "shares one buffer between constant inputs"
    return None


def _name_by_role(model, graph_inputs: int) -> None:
    """Name tensors and signature entries by their role in the op, not by Keras's per-process
    name counters, so that a model's bytes depend only on the seed and the spec."""
    subgraph = model.subgraphs[0]
    op = subgraph.operators[0]
    names = {index: f"input_{slot}" if slot < graph_inputs else f"const_{slot}" for slot, index in enumerate(op.inputs)}
    names[op.outputs[0]] = "output_0"
    for index, tensor in enumerate(subgraph.tensors):
        tensor.name = names.get(index, f"tensor_{index}")
    for signature in model.signatureDefs or ():
        for prefix, entries in (("input", signature.inputs), ("output", signature.outputs)):
            for i, entry in enumerate(entries or ()):
                entry.name = f"{prefix}_{i}"


def _convert_template(spec: LayerSpec, recipe: _Recipe, seed: int):
    """The converted model of the template `spec`, checked and unpacked into a `ModelT`."""
    converted = naive_single_op_model(spec, seed)
    problem = _template_problem(spec, recipe, converted)
    if problem:
        raise ProfilerError(
            f"The TFLite converter {problem} of the template {spec.key}, not one {recipe.opcode} with "
            f"{recipe.graph_inputs} activation input(s) and constant weights/parameters; phonefit cannot make "
            "single-op models for specs like this one. Check profiler.convert.keras_to_tflite, "
            "or leave this spec out of the LUT."
        )
    model = read_model(converted)
    _name_by_role(model, recipe.graph_inputs)
    return model


class SingleOpFactory:
    """Makes single-op `.tflite` models fast, from one converted template per op configuration.

    `build(spec)` gives the same op as `naive_single_op_model(spec, seed)` and the same
    weights; templates are converted on first use and kept by this instance, unpacked.
    Each build overwrites every spec-dependent field of its template (all the op's tensor
    shapes and constant buffers) before packing, so templates are reused in place rather
    than unpacked again (which would double the time per model).  Not thread-safe.
    """

    def __init__(self, seed: int = 0):
        if not isinstance(seed, int) or seed < 0:
            raise ProfilerError(f"`seed` must be a non-negative integer. Received: seed={seed!r}.")
        self.seed = seed
        self._templates: dict[LayerSpec, object] = {}  # template spec -> schema ModelT

    @property
    def template_count(self) -> int:
        """How many templates this factory has converted."""
        return len(self._templates)

    def build(self, spec: LayerSpec) -> bytes:
        """The bytes of a `.tflite` file whose single op is `spec`."""
        recipe = _check_spec(spec)
        template_spec = _template_spec(spec, recipe)
        template = self._templates.get(template_spec)
        if template is None:
            template = _convert_template(template_spec, recipe, self.seed)
            self._templates[template_spec] = template
        written = _rewrite(template, spec, recipe, recipe.consts(spec, _rng(self.seed, spec)))
        return _serialize(template, written)
