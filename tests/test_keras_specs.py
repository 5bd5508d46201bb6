import keras
import pytest

from lut.keras_specs import specs_of_keras
from lut.spec import LayerSpec, UnsupportedLayerError
from lut.tflite_ops import specs_of_tflite
from profiler.convert import keras_to_tflite


def _residual_cnn(resolution: int = 30):
    """An odd size (30 -> 15) keeps a ZeroPadding2D that is not SAME padding as a PAD op."""
    x = inputs = keras.Input((resolution, resolution, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(16, 1, activation="relu")(x)
    x = keras.layers.Add()([x, y])
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)))(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="valid")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(5, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("model_fixture", ["tiny_v1", "tiny_v2"])
def test_keras_specs_equal_the_ops_of_the_converted_model(model_fixture, request):
    model = request.getfixturevalue(model_fixture)
    assert specs_of_keras(model) == specs_of_tflite(keras_to_tflite(model))


def test_mobilenet_v1_specs_fold_batchnorm_fuse_relu6_and_absorb_padding(tiny_v1):
    specs = specs_of_keras(tiny_v1)
    # conv1, 13 dw/pw pairs, conv_preds, reshape, softmax: the mean of a 1x1 map is dropped
    assert len(specs) == 1 + 13 * 2 + 3
    assert specs[0] == LayerSpec("conv2d", 32, 32, 3, 8, (3, 3), (2, 2), "same", "relu6")
    assert specs[3] == LayerSpec("depthwise_conv2d", 16, 16, 16, 16, (3, 3), (2, 2), "same", "relu6")
    assert [s.op for s in specs[-3:]] == ["conv2d", "reshape", "softmax"]


def test_mobilenet_v2_specs_include_residual_adds(tiny_v2):
    ops = [s.op for s in specs_of_keras(tiny_v2)]
    adds = [layer for layer in tiny_v2.layers if type(layer).__name__ == "Add"]
    assert ops.count("add") == len(adds) == 11 and ops.count("depthwise_conv2d") == 17
    assert ops[-3:] == ["mean", "fully_connected", "softmax"]


def test_hand_made_cnn_with_pad_pool_flatten_matches_conversion():
    model = _residual_cnn()
    specs = specs_of_keras(model)
    assert specs == specs_of_tflite(keras_to_tflite(model))
    assert [s.op for s in specs] == [
        "conv2d", "conv2d", "add", "pad", "depthwise_conv2d", "max_pool_2d", "reshape",
        "fully_connected", "fully_connected", "softmax",
    ]
    assert specs[2].activation == "relu6" and specs[3].pads == (0, 1, 0, 1)


def test_out_channels_give_the_specs_of_a_pruned_variant(tiny_v1):
    specs = specs_of_keras(tiny_v1, {"conv_pw_1": 8})
    pw1 = specs[2]
    assert (pw1.cin, pw1.cout) == (8, 8)
    assert specs[3] == specs_of_keras(tiny_v1)[3].replace(cin=8, cout=8)  # dw2 follows
    assert specs[4].cin == 8  # pw2's input follows


def test_unsupported_layer_is_named_with_its_class():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.LayerNormalization(name="ln")(x)
    model = keras.Model(inputs, x)
    with pytest.raises(UnsupportedLayerError, match="Layer 'ln' of class LayerNormalization is not supported"):
        specs_of_keras(model)


def test_unfusable_standalone_activation_is_unsupported():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.ReLU(name="lonely")(inputs)
    with pytest.raises(UnsupportedLayerError, match="'lonely'"):
        specs_of_keras(keras.Model(inputs, x))


def _sequential(with_input: bool = True) -> keras.Sequential:
    layers = [
        keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
        keras.layers.DepthwiseConv2D(3, padding="same"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4, activation="softmax"),
    ]
    return keras.Sequential(([keras.Input((16, 16, 3))] if with_input else []) + layers)


def test_a_sequential_model_object_is_read_as_its_functional_graph(tmp_path):
    from lut.latency import estimate_latency_ms, specs_of
    from lut.table import LatencyTable, Measurement

    model = _sequential()
    specs = specs_of_keras(model)
    assert specs == specs_of_tflite(keras_to_tflite(model))
    assert specs[0] == LayerSpec("conv2d", 16, 16, 3, 8, (3, 3), (2, 2), "same", "relu")
    assert specs_of(model) == specs  # the estimator's entry point takes it too
    assert specs_of_keras(model, {model.layers[0].name: 4})[0].cout == 4
    with LatencyTable.create(tmp_path / "lut.sqlite", {"device": "test"}) as table:
        for spec in specs:
            table.record(spec, Measurement(10.0, 10.0, 10.0, 10.0, 0.0, 1))
        assert estimate_latency_ms(model, table) > 0


@pytest.mark.parametrize("model, expected", [
    (_sequential(with_input=False), "is a keras.Sequential without an input shape"),
    ({"not": "a model"}, "is a dict; expected a functional or Sequential Keras model"),
])
def test_what_has_no_layer_graph_is_one_line_phonefit_error(model, expected):
    from lut.errors import PhonefitError

    with pytest.raises(PhonefitError, match=expected) as e:
        specs_of_keras(model)
    assert "\n" not in str(e.value)
