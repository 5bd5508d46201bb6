"""Reading `.tflite` ops back: `op_details` and `specs_of_tflite` on real converted models."""
import functools
import pathlib
import subprocess
import sys

import pytest

from lut.spec import LayerSpec, LutError, UnsupportedLayerError
from lut.tflite_ops import op_details, specs_of_tflite


def _convert(layers, input_shape):
    import keras

    from profiler.convert import keras_to_tflite

    x = inputs = keras.Input(input_shape, batch_size=1)
    for layer in layers:
        x = layer(x)
    return keras_to_tflite(keras.Model(inputs, x))


def _randomize(model, seed: int = 0):
    """Weights as after training: non-zero biases and BN statistics (an untrained Dense bias is
    all zeros, which the converter drops, so FULLY_CONNECTED would have no bias input)."""
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = [0.1 * rng.standard_normal(w.shape) for w in layer.get_weights()]
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = weights
            weights = [1 + gamma, beta, mean, rng.uniform(0.5, 1.5, variance.shape)]
        layer.set_weights([w.astype(np.float32) for w in weights])
    return model


@functools.cache
def converted_mobilenets() -> dict:
    """MobileNetV1 and V2 (α=0.25, 64×64, 10 classes, trained-like weights) and their `.tflite`.

    64 px, not 32: on 1×1 maps the converter drops V1's MEAN and turns V2's ADDs into
    RESHAPE + broadcast ADD.  Cached for the process: test_layers.py uses them too, and
    each conversion takes seconds.
    """
    from lut.models import build_model
    from profiler.convert import keras_to_tflite

    models = {
        name: _randomize(build_model(name, alpha=0.25, resolution=64, classes=10))
        for name in ("mobilenet_v1", "mobilenet_v2")
    }
    return {name: (model, keras_to_tflite(model)) for name, model in models.items()}


@pytest.fixture
def mobilenets():
    return converted_mobilenets()


def test_specs_of_mobilenet_v1_tflite_lists_every_op_in_execution_order(mobilenets):
    specs = specs_of_tflite(mobilenets["mobilenet_v1"][1])

    assert len(specs) == 31
    assert [s.op for s in specs].count("conv2d") == 15
    assert [s.op for s in specs].count("depthwise_conv2d") == 13
    assert specs[0] == LayerSpec("conv2d", 64, 64, 3, 8, (3, 3), (2, 2), "same", "relu6")
    assert specs[1] == LayerSpec("depthwise_conv2d", 32, 32, 8, 8, (3, 3), (1, 1), "same", "relu6")
    assert specs[-4:] == [
        LayerSpec("mean", 2, 2, 256, 256),
        LayerSpec("conv2d", 1, 1, 256, 10, (1, 1), (1, 1), "same", "none"),
        LayerSpec("reshape", 1, 1, 10, 10),
        LayerSpec("softmax", 1, 1, 10, 10),
    ]


def test_specs_of_mobilenet_v2_tflite_include_residual_adds_and_the_classifier(mobilenets):
    specs = specs_of_tflite(mobilenets["mobilenet_v2"][1])

    assert len(specs) == 66
    # At α=0.25 the first block keeps its 8 channels, so Keras gives it a residual too: 1 + 10 adds.
    assert [s.op for s in specs].count("add") == 11
    assert specs[3] == LayerSpec("add", 32, 32, 8, 8)
    assert LayerSpec("add", 16, 16, 8, 8) in specs  # block_2_add: 64 px / 4, 24 * 0.25 rounded up to 8
    assert specs[-3:] == [
        LayerSpec("mean", 2, 2, 1280, 1280),
        LayerSpec("fully_connected", 1, 1, 1280, 10),
        LayerSpec("softmax", 1, 1, 10, 10),
    ]


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2"])
def test_specs_read_from_tflite_equal_specs_predicted_from_keras(mobilenets, name):
    from lut.keras_specs import specs_of_keras

    model, tflite = mobilenets[name]
    assert specs_of_tflite(tflite) == specs_of_keras(model)


def test_op_details_give_opcode_version_options_and_tensors(mobilenets):
    first = op_details(mobilenets["mobilenet_v1"][1])[0]

    assert first == {
        "opcode": "CONV_2D",
        "version": 1,
        "options": {
            "padding": 0,
            "strideW": 2,
            "strideH": 2,
            "fusedActivationFunction": 3,
            "dilationWFactor": 1,
            "dilationHFactor": 1,
            "quantizedBiasType": 0,
        },
        "inputs": [
            {"shape": (1, 64, 64, 3), "dtype": "float32", "const": False},
            {"shape": (8, 3, 3, 3), "dtype": "float32", "const": True},
            {"shape": (8,), "dtype": "float32", "const": True},
        ],
        "outputs": [{"shape": (1, 32, 32, 8), "dtype": "float32", "const": False}],
    }


def test_pad_and_pool_ops_are_read_with_their_paddings_and_windows():
    import keras

    model = _convert(
        [keras.layers.ZeroPadding2D(((1, 2), (0, 3))), keras.layers.MaxPooling2D(3, strides=2, padding="valid")],
        (9, 9, 4),
    )

    assert specs_of_tflite(model) == [
        LayerSpec("pad", 9, 9, 4, 4, pads=(1, 2, 0, 3)),
        LayerSpec("max_pool_2d", 12, 12, 4, 4, (3, 3), (2, 2), "valid"),
    ]


def test_an_op_phonefit_cannot_key_raises_naming_the_op_and_its_index():
    import keras

    model = _convert([keras.layers.Conv2D(4, 3, padding="same"), keras.layers.Activation("tanh")], (8, 8, 3))

    with pytest.raises(UnsupportedLayerError, match=r"Op #1 \(TANH\) cannot be keyed.*CONV_2D, DEPTHWISE_CONV_2D"):
        specs_of_tflite(model)


def test_a_dilated_convolution_is_unsupported_with_the_reason():
    import keras

    model = _convert([keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same")], (16, 16, 3))

    with pytest.raises(UnsupportedLayerError, match=r"Op #0 \(CONV_2D\).*dilation 2x2"):
        specs_of_tflite(model)


@pytest.mark.parametrize("data", [b"", b"not a flatbuffer at all", b"\x00" * 64])
def test_bytes_that_are_not_a_tflite_file_raise_a_lut_error(data):
    with pytest.raises(LutError, match="Not a TFLite flatbuffer: expected the file identifier b'TFL3'"):
        specs_of_tflite(data)


def test_a_truncated_tflite_file_raises_a_lut_error(mobilenets):
    truncated = mobilenets["mobilenet_v1"][1][:200]

    with pytest.raises(LutError, match="truncated"):
        op_details(truncated)


def test_reading_a_tflite_file_does_not_import_tensorflow(mobilenets, tmp_path):
    path = tmp_path / "v1.tflite"
    path.write_bytes(mobilenets["mobilenet_v1"][1])
    script = (
        "import sys; from lut.tflite_ops import specs_of_tflite; "
        f"specs = specs_of_tflite(open({str(path)!r}, 'rb').read()); "
        "print(len(specs), 'tensorflow' in sys.modules)"
    )

    repo = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=repo)

    assert result.stdout.split() == ["31", "False"]
