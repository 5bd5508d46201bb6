import pytest

from lut.spec import LayerSpec, LutError


def test_key_round_trips_through_text_form():
    specs = [
        LayerSpec("conv2d", 64, 64, 16, 32, (3, 3), (2, 2), "same", "relu6"),
        LayerSpec("depthwise_conv2d", 8, 8, 256, 256, (3, 3), (1, 1), "same", "relu"),
        LayerSpec("pad", 7, 7, 24, 24, pads=(0, 1, 0, 1)),
        LayerSpec("fully_connected", 1, 1, 1280, 10),
    ]
    for spec in specs:
        assert LayerSpec.from_key(spec.key) == spec
    assert specs[0].key == "conv2d:f32:64x64x16:32:k3x3:s2x2:same:relu6"
    assert specs[2].key.endswith(":p0,1,0,1")


def test_specs_are_hashable_and_equal_by_value():
    a = LayerSpec("conv2d", 8, 8, 16, 32)
    assert {a: 1}[LayerSpec("conv2d", 8, 8, 16, 32)] == 1
    assert a.replace(cout=24).cout == 24 and a.cout == 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(op="lstm", h=1, w=1, cin=1, cout=1), "`op` must be one of"),
        (dict(op="conv2d", h=0, w=1, cin=1, cout=1), "`h` must be a positive integer. Received: h=0"),
        (dict(op="conv2d", h=1, w=1, cin=1, cout=1, padding="full"), "`padding` must be 'same' or 'valid'"),
        (dict(op="depthwise_conv2d", h=1, w=1, cin=8, cout=16), "cin == cout"),
        (dict(op="conv2d", h=1, w=1, cin=1, cout=1, dtype="float16"), "`dtype` must be one of"),
    ],
)
def test_invalid_specs_say_what_was_expected_and_received(kwargs, message):
    with pytest.raises(LutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LayerSpec(**kwargs)


def test_malformed_key_is_rejected_with_an_example():
    with pytest.raises(LutError, match="looks like 'conv2d:f32"):
        LayerSpec.from_key("conv2d 64x64")


def test_output_size_follows_tensorflow_padding_arithmetic():
    assert LayerSpec("conv2d", 7, 7, 8, 8, (3, 3), (2, 2), "same").output_hw == (4, 4)
    assert LayerSpec("conv2d", 7, 7, 8, 8, (3, 3), (2, 2), "valid").output_hw == (3, 3)
    assert LayerSpec("pad", 7, 7, 8, 8, pads=(0, 1, 0, 1)).output_hw == (8, 8)
