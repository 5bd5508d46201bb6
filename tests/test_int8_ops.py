"""int8 ops: a full-integer MobileNet's ops as specs, and single-op int8 models that run exactly them."""
import functools

import numpy as np
import pytest

from lut.keras_specs import specs_of_keras
from lut.spec import LayerSpec, LutError
from lut.tflite_ops import op_details, read_model, specs_of_tflite
from profiler.host_worker import load_interpreter
from profiler.single_op import SingleOpFactory, naive_single_op_model
from profiler.single_op.recipes import RECIPES, spec_rng
from tests.test_layers import SPECS, _without_keep_dims
from tests.test_tflite_ops import converted_mobilenets


@functools.cache
def int8_mobilenets() -> dict:
    """MobileNetV1 and V2 (α=0.25, 64 px) converted to int8 with float input and output, as deployed."""
    from profiler.convert import keras_to_tflite

    calibration = [np.random.default_rng(0).standard_normal((8, 64, 64, 3)).astype(np.float32)]
    return {name: (model, keras_to_tflite(model, representative_data=calibration))
            for name, (model, _) in converted_mobilenets().items()}


def _quantization_layout(model: bytes, op_index: int = 0) -> list[tuple[int, int]]:
    """(tensor type, number of scales) of each input and output of one op: per-channel or per-tensor."""
    subgraph = read_model(model).subgraphs[0]
    op = subgraph.operators[op_index]
    layout = []
    for index in [*op.inputs, *op.outputs]:
        q = subgraph.tensors[index].quantization
        layout.append((subgraph.tensors[index].type, 0 if q is None or q.scale is None else len(q.scale)))
    return layout


@pytest.fixture(scope="module")
def factory():
    return SingleOpFactory(seed=0)


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2"])
def test_keras_int8_specs_are_the_ops_of_the_converted_int8_model(name):
    model, whole = int8_mobilenets()[name]
    specs = specs_of_tflite(whole)

    assert specs_of_keras(model, dtype="int8") == specs
    assert specs[0] == LayerSpec("quantize", 64, 64, 3, 3, dtype="int8")
    assert specs[-1] == LayerSpec("dequantize", 1, 1, 10, 10, dtype="int8")
    # Between them, the float model's ops, each int8.
    assert specs[1:-1] == [spec.replace(dtype="int8") for spec in specs_of_keras(model)]


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2"])
def test_int8_single_op_models_run_exactly_the_ops_of_a_converted_int8_mobilenet(factory, name):
    whole = int8_mobilenets()[name][1]

    for index, (spec, details) in enumerate(zip(specs_of_tflite(whole), op_details(whole), strict=True)):
        single = factory.build(spec)
        assert [_without_keep_dims(d) for d in op_details(single)] == [_without_keep_dims(details)], spec.key
        assert specs_of_tflite(single) == [spec]
        # Per-channel weights and biases where the converter makes them, one scale elsewhere.
        assert _quantization_layout(single) == _quantization_layout(whole, index), spec.key


@pytest.mark.parametrize("case", ["conv2d", "depthwise_conv2d", "fully_connected", "pointwise"])
def test_int8_weights_are_the_recipes_float_weights_rounded_to_their_channels_scale(factory, case):
    spec = SPECS[case].replace(dtype="int8")
    subgraph = read_model(factory.build(spec)).subgraphs[0]
    op = subgraph.operators[0]
    weights, bias = (subgraph.tensors[i] for i in op.inputs[1:3])
    floats = RECIPES[spec.op].consts(spec, spec_rng(0, spec))
    q_weights = np.frombuffer(bytes(read_model(factory.build(spec)).buffers[weights.buffer].data), np.int8)
    axis = weights.quantization.quantizedDimension
    scales = np.expand_dims(np.asarray(weights.quantization.scale, np.float32),
                            tuple(d for d in range(floats[1].ndim) if d != axis))

    dequantized = q_weights.reshape(floats[1].shape) * scales
    assert np.all(np.abs(dequantized - floats[1]) <= scales / 2 * (1 + 1e-5))
    assert np.abs(q_weights).max() == 127  # symmetric: each channel's largest weight is ±127
    input_scale = np.float32(subgraph.tensors[op.inputs[0]].quantization.scale[0])
    assert bias.quantization.scale == pytest.approx(list(input_scale * scales.ravel()), rel=1e-6)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_int8_single_op_models_run_on_litert_with_int8_input_and_output(factory, case):
    spec = SPECS[case].replace(dtype="int8")
    interpreter = load_interpreter(factory.build(spec), 1)
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], np.ones(detail["shape"], np.int8))
    interpreter.invoke()

    assert [d["dtype"] for d in interpreter.get_input_details()] == [np.int8] * RECIPES[spec.op].graph_inputs
    assert interpreter.get_output_details()[0]["dtype"] == np.int8


@pytest.mark.parametrize("op, dtypes", [("quantize", (np.float32, np.int8)), ("dequantize", (np.int8, np.float32))])
def test_quantize_and_dequantize_models_are_that_one_op_between_float_and_int8(factory, op, dtypes):
    spec = LayerSpec(op, 8, 8, 3, 3, dtype="int8")
    for model in (factory.build(spec), naive_single_op_model(spec)):
        assert [d["opcode"] for d in op_details(model)] == [op.upper()]
        interpreter = load_interpreter(model, 1)
        interpreter.allocate_tensors()
        assert (interpreter.get_input_details()[0]["dtype"], interpreter.get_output_details()[0]["dtype"]) == dtypes
        assert list(interpreter.get_input_details()[0]["shape"]) == [1, 8, 8, 3]


def test_quantize_specs_are_keyed_int8_only():
    with pytest.raises(LutError, match="keyed int8"):
        LayerSpec("quantize", 8, 8, 3, 3)
    assert LayerSpec("dequantize", 1, 1, 10, 10, dtype="int8").key == "dequantize:i8:1x1x10:10:k1x1:s1x1:valid:none"
