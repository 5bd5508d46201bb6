"""Single-op models from recipes: the naive way (one conversion per spec) and the fast way
(`SingleOpFactory`: rewrite one converted template per op configuration)."""
from __future__ import annotations

import copy
import functools
from typing import Any, TypeAlias

import flatbuffers
import numpy as np

from lut.spec import LayerSpec
from lut.tflite_ops import op_details, read_model, tflite_schema
from profiler.convert import keras_to_tflite, random_calibration
from profiler.errors import ProfilerError
from profiler.single_op.quantized import quantize_consts
from profiler.single_op.recipes import Consts, KerasLayer, Recipe, check_spec, spec_rng, template_spec

__all__ = ["SingleOpFactory", "keras_layers_for", "naive_single_op_model"]

_BUFFER_ALIGNMENT = 16  # what the converter uses for constant buffers
_FILE_IDENTIFIER = b"TFL3"
ModelT: TypeAlias = Any  # the TFLite schema's generated object API ships no type information


# ---- the naive way: one converter call per spec -----------------------------------------


def keras_layers_for(spec: LayerSpec) -> list[KerasLayer]:
    """The Keras layers that TFLite turns into the op of `spec`, applied in order to its input(s).

    `add` starts with `keras.layers.Add` (two inputs); an activation the op fuses is
    either the first layer's `activation` or a separate `Activation` layer after it.
    """
    recipe = check_spec(spec)
    import keras  # TensorFlow takes seconds to import: only building a model pays for it

    return recipe.keras_layers(spec, keras)


def _keras_model(spec: LayerSpec, recipe: Recipe, consts: Consts) -> Any:
    """A one-input Keras model of `spec`'s layers; a two-input op gets its one input twice."""
    import keras  # TensorFlow takes seconds to import: only building a model pays for it

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


def _keep_one_op(converted: bytes, index: int) -> bytes:
    """The model of the op at `index` of `converted` alone: its input and output become the model's."""
    model = read_model(converted)
    subgraph = model.subgraphs[0]
    op = subgraph.operators[index]
    subgraph.operators = [op]
    subgraph.inputs, subgraph.outputs = [op.inputs[0]], [op.outputs[0]]
    for signature in model.signatureDefs or ():
        signature.inputs, signature.outputs = signature.inputs[:1], signature.outputs[:1]
        signature.inputs[0].tensorIndex, signature.outputs[0].tensorIndex = op.inputs[0], op.outputs[0]
    return _serialize(model, len(converted))


def naive_single_op_model(spec: LayerSpec, seed: int = 0) -> bytes:
    """`spec`'s single-op model made the slow way: Keras layers → `profiler.convert.keras_to_tflite`.

    Same op and weights as `SingleOpFactory(seed).build(spec)` (for an int8 spec, the same
    float weights before each quantizes them).  An int8 op is converted with int8 input and
    output, so that its model runs that op alone, as inside a full-integer model.
    """
    recipe = check_spec(spec)
    model = _keras_model(spec, recipe, recipe.consts(spec, spec_rng(seed, spec)))
    if spec.dtype == "float32":
        converted = keras_to_tflite(model)
    else:
        batches = random_calibration(model, seed)
        converted = keras_to_tflite(model, representative_data=batches, int8_io=recipe.keep is None)
        if recipe.keep is not None:
            converted = _keep_one_op(converted, recipe.keep)
    return converted if recipe.graph_inputs == 1 else _separate_graph_inputs(converted, recipe.graph_inputs)


# ---- the fast way: rewrite a converted template -----------------------------------------


@functools.cache
def _aligned_buffer_type() -> type[Any]:
    """`BufferT` that packs its bytes 16-byte aligned, as the converter does (the stock one aligns to 1)."""
    schema = tflite_schema()
    buffer_t: type[Any] = schema.BufferT

    class AlignedBufferT(buffer_t):  # type: ignore[misc]  # the generated schema is untyped
        def Pack(self, builder: flatbuffers.Builder) -> int:
            payload = self.data
            builder.StartVector(1, len(payload), _BUFFER_ALIGNMENT)
            builder.head -= len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            data = builder.EndVector()
            schema.BufferStart(builder)
            schema.BufferAddData(builder, data)
            end: int = schema.BufferEnd(builder)
            return end

    return AlignedBufferT


def _set_shape(tensor: Any, shape: tuple[int, ...]) -> None:
    tensor.shape = np.asarray(shape, dtype=np.int32)
    if tensor.shapeSignature is not None:
        tensor.shapeSignature = np.asarray(shape, dtype=np.int32)


def _rewrite(model: ModelT, spec: LayerSpec, recipe: Recipe, consts: Consts) -> int:
    """Give the template's op `spec`'s shapes and `consts`; return the bytes of constants written."""
    subgraph = model.subgraphs[0]
    op = subgraph.operators[0]
    for slot, shape in enumerate(recipe.input_shapes(spec)):
        _set_shape(subgraph.tensors[op.inputs[slot]], shape)
    _set_shape(subgraph.tensors[op.outputs[0]], recipe.output_shape(spec))
    if getattr(op.builtinOptions, "newShape", None) is not None:  # RESHAPE may repeat its shape here
        op.builtinOptions.newShape = list(recipe.output_shape(spec))
    if spec.dtype == "int8":
        consts = quantize_consts(subgraph, op, consts)
    written = 0
    for slot, values in consts.items():
        payload = values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
        model.buffers[subgraph.tensors[op.inputs[slot]].buffer] = _aligned_buffer_type()(data=payload)
        written += values.nbytes
    return written


def _serialize(model: ModelT, size_hint: int) -> bytes:
    builder = flatbuffers.Builder(size_hint + 4096)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def _template_problem(spec: LayerSpec, recipe: Recipe, model: bytes) -> str | None:
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


def _name_by_role(model: ModelT, graph_inputs: int) -> None:
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


def _convert_template(spec: LayerSpec, recipe: Recipe, seed: int) -> ModelT:
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
        self._templates: dict[LayerSpec, ModelT] = {}  # template spec -> schema ModelT

    @property
    def template_count(self) -> int:
        """How many templates this factory has converted."""
        return len(self._templates)

    def build(self, spec: LayerSpec) -> bytes:
        """The bytes of a `.tflite` file whose single op is `spec`."""
        recipe = check_spec(spec)
        small = template_spec(spec, recipe)
        template = self._templates.get(small)
        if template is None:
            template = _convert_template(small, recipe, self.seed)
            self._templates[small] = template
        written = _rewrite(template, spec, recipe, recipe.consts(spec, spec_rng(self.seed, spec)))
        return _serialize(template, written)

