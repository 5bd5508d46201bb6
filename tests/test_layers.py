"""Single-op models: the op of the whole converted model, computing what the Keras layer computes."""
import time

import numpy as np
import pytest

from lut.spec import LayerSpec
from lut.tflite_ops import op_details, read_model, specs_of_tflite
from profiler.errors import ProfilerError
from profiler.host_worker import load_interpreter
from profiler.single_op import SingleOpFactory, keras_layers_for, naive_single_op_model
from tests.test_tflite_ops import converted_mobilenets

# One spec per op kind, with the windows, activations and shapes MobileNets use.
SPECS = {
    "conv2d": LayerSpec("conv2d", 9, 9, 5, 7, (3, 3), (2, 2), "same", "relu6"),
    "conv2d_valid": LayerSpec("conv2d", 9, 8, 3, 4, (3, 3), (2, 1), "valid", "relu"),
    "pointwise": LayerSpec("conv2d", 6, 6, 16, 24, (1, 1), (1, 1), "same", "none"),
    "depthwise_conv2d": LayerSpec("depthwise_conv2d", 10, 10, 12, 12, (3, 3), (2, 2), "same", "relu6"),
    "fully_connected": LayerSpec("fully_connected", 1, 1, 40, 10),
    "add": LayerSpec("add", 6, 5, 8, 8),
    "add_relu": LayerSpec("add", 3, 4, 8, 8, activation="relu"),
    "mean": LayerSpec("mean", 7, 7, 16, 16),
    "average_pool_2d": LayerSpec("average_pool_2d", 8, 8, 4, 4, (2, 2), (2, 2)),
    "max_pool_2d": LayerSpec("max_pool_2d", 9, 9, 3, 3, (3, 3), (2, 2), "same"),
    "pad": LayerSpec("pad", 7, 7, 6, 6, pads=(0, 1, 2, 1)),
    "reshape": LayerSpec("reshape", 2, 3, 4, 24),
    "softmax": LayerSpec("softmax", 1, 1, 10, 10),
}


@pytest.fixture(scope="module")
def factory():
    return SingleOpFactory(seed=0)


@pytest.fixture
def mobilenets():
    return converted_mobilenets()


def _without_keep_dims(details: dict) -> dict:
    """MEAN's keepDims (True in MobileNetV1, False in V2) is not part of a LayerSpec; single-op
    models use False, so compare MEANs without it and without the rank of its output."""
    if details["opcode"] != "MEAN":
        return details
    options = {k: v for k, v in details["options"].items() if k != "keepDims"}
    outputs = [{**t, "shape": (t["shape"][0], t["shape"][-1])} for t in details["outputs"]]
    return {**details, "options": options, "outputs": outputs}


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2"])
def test_single_op_models_run_exactly_the_ops_of_a_converted_mobilenet(mobilenets, factory, name):
    whole = mobilenets[name][1]
    specs = specs_of_tflite(whole)

    for spec, details in zip(specs, op_details(whole), strict=True):
        single = factory.build(spec)
        assert [_without_keep_dims(d) for d in op_details(single)] == [_without_keep_dims(details)], spec.key
        assert specs_of_tflite(single) == [spec]
    # Templates are per op configuration, not per shape: 66 ops of V2 need only a handful.
    assert factory.template_count <= 16


def test_only_keep_dims_differs_for_mobilenet_v1_mean(mobilenets, factory):
    whole = op_details(mobilenets["mobilenet_v1"][1])
    (index,) = [i for i, d in enumerate(whole) if d["opcode"] == "MEAN"]
    single = op_details(factory.build(specs_of_tflite(mobilenets["mobilenet_v1"][1])[index]))[0]

    assert whole[index]["options"] == {"keepDims": True}
    assert single["options"] == {"keepDims": False}
    assert whole[index]["outputs"][0]["shape"] == (1, 1, 1, 256)
    assert single["outputs"][0]["shape"] == (1, 256)


def _constants(model: bytes) -> dict[int, np.ndarray]:
    """The constant inputs of the single op, by input slot, read back from the flatbuffer."""
    flat = read_model(model)
    subgraph = flat.subgraphs[0]
    types = {0: "<f4", 2: "<i4"}  # TensorType FLOAT32, INT32
    constants = {}
    for slot, index in enumerate(subgraph.operators[0].inputs):
        tensor = subgraph.tensors[index]
        data = flat.buffers[tensor.buffer].data
        if data is not None and len(data):
            constants[slot] = np.frombuffer(np.asarray(data, np.uint8).tobytes(), types[tensor.type]).reshape(tensor.shape)
    return constants


# TFLite constant layout -> the Keras layer's weights.
_TO_KERAS = {
    "conv2d": lambda c: [c[1].transpose(1, 2, 3, 0), c[2]],  # [cout, kh, kw, cin] -> [kh, kw, cin, cout]
    "depthwise_conv2d": lambda c: [c[1].transpose(1, 2, 3, 0), c[2]],  # [1, kh, kw, c] -> [kh, kw, c, 1]
    "fully_connected": lambda c: [c[1].T, c[2]],  # [units, in] -> [in, units]
}


def _run_litert(model: bytes) -> tuple[list[np.ndarray], np.ndarray]:
    interpreter = load_interpreter(model, 1)  # fills the inputs with random normal data
    inputs = [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_input_details()]
    interpreter.invoke()
    return inputs, interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def _run_keras(spec: LayerSpec, constants: dict[int, np.ndarray], inputs: list[np.ndarray]) -> np.ndarray:
    layers = keras_layers_for(spec)
    x = inputs[0] if len(inputs) == 1 else inputs
    for i, layer in enumerate(layers):
        if i == 0 and spec.op in _TO_KERAS:
            layer.build(x.shape)
            layer.set_weights(_TO_KERAS[spec.op](constants))
        x = layer(x)
    return np.asarray(x)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_generated_model_computes_what_the_keras_layer_computes(factory, case):
    spec = SPECS[case]
    model = factory.build(spec)

    inputs, output = _run_litert(model)
    expected = _run_keras(spec, _constants(model), inputs)

    assert output.shape == expected.shape
    assert np.max(np.abs(output - expected)) <= 1e-4
    assert np.std(output) > 1e-3  # not a trivially zero output


@pytest.mark.parametrize("case", ["conv2d", "depthwise_conv2d", "fully_connected", "add_relu", "pad", "reshape"])
def test_fast_path_equals_the_one_conversion_per_spec_path(factory, case):
    spec = SPECS[case].replace(cin=SPECS[case].cin * 3, cout=SPECS[case].cout * 3) if case == "conv2d" else SPECS[case]
    fast, naive = factory.build(spec), naive_single_op_model(spec, seed=0)

    assert op_details(fast) == op_details(naive)
    assert _run_litert(fast)[1].tobytes() == _run_litert(naive)[1].tobytes()  # same weights, same input


def test_large_specs_keep_the_converters_op_when_rewritten_from_a_small_template(factory):
    spec = LayerSpec("conv2d", 64, 64, 96, 128, (3, 3), (2, 2), "same", "relu6")

    assert op_details(factory.build(spec)) == op_details(naive_single_op_model(spec))


def test_weights_are_scaled_normals_without_zeros_deterministic_per_seed_and_spec():
    spec = LayerSpec("conv2d", 8, 8, 64, 64, (3, 3), (1, 1), "same", "relu6")
    other = LayerSpec("conv2d", 8, 8, 64, 32, (3, 3), (1, 1), "same", "relu6")
    first = SingleOpFactory(seed=0)
    first.build(other)  # build order does not matter

    model = first.build(spec)
    weights, bias = _constants(model)[1], _constants(model)[2]

    assert model == SingleOpFactory(seed=0).build(spec)
    assert model != SingleOpFactory(seed=1).build(spec)
    assert weights.shape == (64, 3, 3, 64) and bias.shape == (64,)
    assert 0.095 < weights.std() < 0.105
    assert np.abs(weights).min() >= 1e-4 and np.abs(bias).min() >= 1e-4


def test_constant_buffers_are_16_byte_aligned_like_the_converters(factory):
    model = factory.build(SPECS["conv2d"])

    for values in _constants(model).values():
        assert model.find(values.tobytes()) % 16 == 0


def test_keras_layers_for_a_spec_carry_its_window_and_activation():
    (conv,) = keras_layers_for(SPECS["conv2d"])
    add, relu = keras_layers_for(SPECS["add_relu"])

    assert (type(conv).__name__, conv.filters, conv.kernel_size, conv.strides, conv.padding) == (
        "Conv2D", 7, (3, 3), (2, 2), "same"
    )
    assert conv.get_config()["activation"] == "relu6"
    assert (type(add).__name__, type(relu).__name__, relu.get_config()["activation"]) == ("Add", "Activation", "relu")


def test_generating_is_much_faster_than_one_conversion_per_spec():
    specs = [LayerSpec("conv2d", 16, 16, cin, cout, (1, 1), (1, 1), "same", "relu6") for cin in (8, 16) for cout in (8, 16)]
    factory = SingleOpFactory()
    factory.build(specs[0])  # converts the one template these share

    start = time.perf_counter()
    for spec in specs:
        factory.build(spec)
    fast = time.perf_counter() - start
    start = time.perf_counter()
    for spec in specs:
        naive_single_op_model(spec)
    naive = time.perf_counter() - start

    assert factory.template_count == 1
    assert naive / fast >= 5, f"fast {fast:.3f} s, naive {naive:.3f} s for {len(specs)} specs"



@pytest.mark.parametrize(
    "spec, message",
    [
        (LayerSpec("mean", 4, 4, 8, 8, activation="relu"), "mean fuses no activation"),
        (LayerSpec("reshape", 2, 2, 3, 10), r"expected cout == h\*w\*cin == 12, received 10"),
        (LayerSpec("fully_connected", 4, 4, 8, 10), "expected h = w = 1, received 4x4"),
        (LayerSpec("max_pool_2d", 2, 2, 8, 8, (3, 3), (1, 1), "valid"), "3x3 valid window does not fit a 2x2 input"),
        (LayerSpec("softmax", 1, 1, 10, 10, kernel=(3, 3)), "softmax has no window"),
        (LayerSpec("pad", 4, 4, 8, 8), r"not all zero .* received \(0, 0, 0, 0\)"),
    ],
)
def test_specs_that_cannot_be_built_raise_saying_why(spec, message):
    with pytest.raises(ProfilerError, match=f"Cannot build a single-op model for {spec.key}: .*{message}"):
        SingleOpFactory().build(spec)
    with pytest.raises(ProfilerError, match=message):
        naive_single_op_model(spec)


def test_a_one_pixel_add_is_built_from_a_larger_template_as_one_add():
    # The converter would reshape one addend of a 1x1 ADD and broadcast (MobileNetV2 at 32 px
    # does this); the template is converted at 2x2 and rewritten to one equal-shaped ADD.
    spec = LayerSpec("add", 1, 1, 32, 32)
    [details] = op_details(SingleOpFactory().build(spec))
    assert details["opcode"] == "ADD"
    assert [t["shape"] for t in details["inputs"]] == [(1, 1, 1, 32)] * 2


def test_anything_but_a_layer_spec_is_refused():
    with pytest.raises(ProfilerError, match="must be a lut.LayerSpec. Received: str"):
        SingleOpFactory().build("conv2d:f32:8x8x8:8:k1x1:s1x1:same:none")
