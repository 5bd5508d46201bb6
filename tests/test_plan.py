import pytest

from lut.keras_specs import specs_of_keras
from profiler.errors import ProfilerError
from profiler.plan import channel_grid, plan_specs, prunable_layers


def test_channel_grid_holds_multiples_of_step_and_the_original_count():
    assert channel_grid(32, 8) == [8, 16, 24, 32]
    assert channel_grid(20, 8) == [8, 16, 20]
    assert channel_grid(3, 8) == [3]
    with pytest.raises(ProfilerError, match="`step` must be a positive integer. Received: step=0"):
        channel_grid(32, 0)


def test_classifier_is_not_prunable(tiny_v1, tiny_v2):
    assert "conv_preds" not in prunable_layers(tiny_v1)
    assert "conv_pw_13" in prunable_layers(tiny_v1)
    assert "predictions" not in prunable_layers(tiny_v2)
    assert "block_16_project" in prunable_layers(tiny_v2)


def test_plan_covers_the_channel_grid_of_every_layer(tiny_v1):
    specs = plan_specs([tiny_v1], step=8)
    keys = {s.key for s in specs}
    assert len(keys) == len(specs)  # deduplicated
    original = specs_of_keras(tiny_v1)
    assert {s.key for s in original} <= keys
    # conv_pw_13 of V1 α=0.25: 256 -> 256 channels on a 1x1 map: the full 32 x 32 grid
    pw13 = [s for s in specs if s.op == "conv2d" and s.h == 1 and s.kernel == (1, 1) and s.cout != 10]
    assert {(s.cin, s.cout) for s in pw13} >= {(8, 8), (8, 256), (256, 8), (256, 256), (136, 72)}
    # depthwise layers keep in == out; the first conv keeps its 3 input channels
    assert all(s.cin == s.cout for s in specs if s.op == "depthwise_conv2d")
    assert {s.cin for s in specs if s.op == "conv2d" and s.h == 32} == {3}
    # the classifier's 10 outputs never change, its inputs do
    head = [s for s in specs if s.op == "conv2d" and s.cout == 10]
    assert len(head) == 256 // 8 and {s.cin for s in head} == set(range(8, 257, 8))
    assert {s.cin for s in specs if s.op == "softmax"} == {10}


def test_plan_deduplicates_across_models(tiny_v1):
    one = plan_specs([tiny_v1], step=8)
    assert [s.key for s in plan_specs([tiny_v1, tiny_v1], step=8)] == [s.key for s in one]


def test_residual_adds_and_pooling_follow_the_pruned_channels(tiny_v2):
    specs = plan_specs([tiny_v2], step=8)
    adds = [s for s in specs if s.op == "add"]
    assert adds and all(s.cin == s.cout for s in adds)
    assert {s.cin for s in adds if s.h == 4} == set(channel_grid(8, 8))  # block_2_add: 8 channels at 4x4 (α=0.25)
    assert {s.cin for s in specs if s.op == "mean"} == set(channel_grid(1280, 8))
