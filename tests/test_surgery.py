"""Channel groups and structured pruning of small real Keras models (adapter.pruning.graph / .surgery)."""
import keras
import numpy as np
import pytest

from adapter.pruning.graph import PruningError, UnsupportedLayerError, analyze, find_groups
from adapter.pruning.surgery import channel_counts, filter_norms, prune, prune_to_counts, pruned_weights

L = keras.layers


def _randomized(model, seed=0):
    """Give every weight a non-trivial value (BN statistics included), so exact copies matter."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if variable.name in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.3, shape)
        variable.assign(value.astype("float32"))
    return model


def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def _small_cnn():
    """Residual Adds, a Concatenate, a Reshape and Flatten→Dense in one graph."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = _chain(
        inputs,
        L.Conv2D(8, 3, padding="same", name="stem"),
        L.BatchNormalization(name="stem_bn"),
        L.ReLU(name="stem_relu"),
    )
    y = _chain(x, L.Conv2D(8, 3, padding="same", name="res_conv"), L.BatchNormalization(name="res_bn"))
    x = L.ReLU(max_value=6, name="res_relu6")(L.Add(name="res_add")([x, y]))
    a = _chain(x, L.Conv2D(6, 1, name="branch_a"), L.ReLU(name="branch_a_relu"))
    b = _chain(
        x,
        L.DepthwiseConv2D(3, padding="same", name="branch_b_dw"),
        L.BatchNormalization(name="branch_b_dw_bn"),
        L.Conv2D(4, 1, name="branch_b"),
    )
    x = L.Concatenate(name="concat")([a, b])
    p = L.Conv2D(12, 1, name="proj")(x)
    q = _chain(
        x, L.SeparableConv2D(12, 3, padding="same", name="sep"), L.BatchNormalization(name="sep_bn")
    )
    x = _chain(
        L.Add(name="proj_add")([p, q]),
        L.MaxPooling2D(2, name="pool"),
        L.ZeroPadding2D(1, name="pad"),
        L.Conv2D(6, 3, name="tail"),
        L.AveragePooling2D(2, name="avg"),
    )
    squeezed = _chain(
        x, L.GlobalAveragePooling2D(keepdims=True, name="gap"), L.Reshape((6,), name="squeeze")
    )
    x = L.Concatenate(name="features")([L.Flatten(name="flatten")(x), squeezed])
    x = _chain(x, L.Dense(16, activation="relu", name="fc"), L.Dropout(0.2, name="drop"))
    outputs = L.Dense(10, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


_TINY = dict(alpha=0.25, input_shape=(32, 32, 3), weights=None, classes=10)


@pytest.fixture(scope="module")
def mobilenet_v1():
    model = keras.applications.MobileNet(**_TINY)
    return _randomized(model, seed=1)


@pytest.fixture(scope="module")
def mobilenet_v2():
    model = keras.applications.MobileNetV2(**_TINY)
    return _randomized(model, seed=2)


@pytest.fixture(scope="module")
def small_cnn():
    return _randomized(_small_cnn(), seed=3)


def _images(model, count=4, seed=7):
    shape = (count,) + tuple(model.input_shape[1:])
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype("float32")


def _outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))  # eager: no graph tracing


def _max_difference(a, b, x):
    return float(np.max(np.abs(_outputs(a, x) - _outputs(b, x))))


def _weight(model, layer, name):
    return next(keras.ops.convert_to_numpy(v) for v in model.get_layer(layer).weights if v.name == name)


def _assert_sliced(pruned, original, layer, weight, *indexes):
    """`pruned`'s weight is exactly `original`'s indexed by each of `indexes` in turn."""
    expected = _weight(original, layer, weight)
    for index in indexes:
        expected = expected[index]
    np.testing.assert_array_equal(_weight(pruned, layer, weight), expected)


# --- groups -------------------------------------------------------------------------


def test_mobilenet_v1_has_one_group_per_pointwise_conv_and_the_first_conv(mobilenet_v1):
    groups = find_groups(mobilenet_v1)
    assert [g.id for g in groups] == ["conv1"] + [f"conv_pw_{i}" for i in range(1, 14)]
    for group in groups:
        assert group.producers == (group.id,)
        assert group.size == mobilenet_v1.get_layer(group.id).filters
    assert [g.size for g in groups] == [8, 16, 32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 256, 256]
    first = groups[0]
    assert first.followers == ("conv1_bn", "conv1_relu", "conv_dw_1", "conv_dw_1_bn", "conv_dw_1_relu")
    assert first.consumers == (("conv_pw_1", 0, 1),)
    # conv_preds feeds the model output through a Reshape: never prunable.
    assert groups[-1].consumers == (("conv_preds", 0, 1),)


def test_mobilenet_v2_ties_the_projections_of_each_residual_stage(mobilenet_v2):
    groups = {g.id: g for g in find_groups(mobilenet_v2)}
    assert groups["block_1_project"].producers == ("block_1_project", "block_2_project")
    for first, tied in ((3, (3, 4, 5)), (6, (6, 7, 8, 9)), (10, (10, 11, 12)), (13, (13, 14, 15))):
        assert groups[f"block_{first}_project"].producers == tuple(f"block_{i}_project" for i in tied)
    assert groups["block_16_project"].producers == ("block_16_project",)
    assert "block_2_add" in groups["block_1_project"].followers
    assert groups["block_1_project"].consumers == (("block_2_expand", 0, 1), ("block_3_expand", 0, 1))
    producers = [p for g in groups.values() for p in g.producers]
    assert len(producers) == len(set(producers))
    assert "block_2_project" not in groups  # joined block_1_project's group
    assert groups["block_5_expand"].producers == ("block_5_expand",)
    assert groups["block_5_expand"].size == mobilenet_v2.get_layer("block_5_expand").filters
    assert "Conv_1" in groups and groups["Conv_1"].consumers == (("predictions", 0, 1),)
    assert "predictions" not in producers
    # At α=0.25 the first block keeps 8 channels at stride 1, so Keras adds a residual
    # (expanded_conv_add) and its projection joins Conv1's group.
    assert groups["Conv1"].producers == ("Conv1", "expanded_conv_project")
    # Conv1's group, 16 expands, 6 stage projection groups, Conv_1.
    assert len(groups) == 24
    assert len([g for g in groups if g.endswith("_expand")]) == 16
    assert len([g for g in groups if g.endswith("_project")]) == 6


def test_concatenation_offsets_and_flatten_scale_reach_the_consumers(small_cnn):
    groups = {g.id: g for g in find_groups(small_cnn)}
    assert list(groups) == ["stem", "branch_a", "branch_b", "proj", "tail", "fc"]
    assert groups["stem"].producers == ("stem", "res_conv")
    assert groups["proj"].producers == ("proj", "sep")
    assert groups["branch_a"].consumers == (("proj", 0, 1), ("sep", 0, 1))
    assert groups["branch_b"].consumers == (("proj", 6, 1), ("sep", 6, 1))
    # Flatten of 4×4×6 puts channel c at p*6 + c; the squeezed GAP follows at 96 + c.
    assert groups["tail"].consumers == (("fc", 0, 16), ("fc", 96, 1))
    counts = {"stem": 8, "branch_a": 6, "branch_b": 4, "proj": 12, "tail": 6, "fc": 16}
    assert channel_counts(small_cnn) == counts


def test_channels_reaching_a_model_output_are_not_prunable():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="body")(inputs)
    outputs = L.GlobalAveragePooling2D(name="gap")(L.Conv2D(5, 1, name="head")(x))
    groups = find_groups(keras.Model(inputs, outputs))
    assert [(g.id, g.size) for g in groups] == [("body", 4)]


def test_an_add_of_a_concatenation_and_a_conv_fixes_both_sides():
    inputs = keras.Input((8, 8, 3))
    a, b = L.Conv2D(2, 1, name="a")(inputs), L.Conv2D(3, 1, name="b")(inputs)
    c = L.Conv2D(5, 1, name="c")(inputs)
    x = L.Add(name="mixed_add")([L.Concatenate()([a, b]), c])
    outputs = L.Dense(2, name="out")(L.Flatten()(L.Conv2D(4, 1, name="d")(x)))
    assert [g.id for g in find_groups(keras.Model(inputs, outputs))] == ["d"]


# --- surgery ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "small_cnn"])
def test_keeping_every_channel_reproduces_the_outputs(name, request):
    model = request.getfixturevalue(name)
    keep = {g.id: list(range(g.size)) for g in find_groups(model)}
    pruned = prune(model, keep)
    assert pruned is not model
    assert pruned.count_params() == model.count_params()
    assert _max_difference(model, pruned, _images(model)) <= 1e-5


def test_pruning_to_counts_gives_the_asked_shapes_and_copies_the_top_l2_filters(mobilenet_v1):
    model = mobilenet_v1
    counts = {"conv_pw_3": 12, "conv_pw_4": 40, "conv_pw_13": 100}
    pruned = prune_to_counts(model, counts)
    assert channel_counts(pruned) == {**channel_counts(model), **counts}
    assert _outputs(pruned, _images(model)).shape == (4, 10)

    def top(layer, count):
        kernel = _weight(model, layer, "kernel")
        norms = np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0)
        np.testing.assert_allclose(filter_norms(model, groups[layer]), norms, rtol=1e-6)
        return np.sort(np.argsort(-norms)[:count])

    groups = {g.id: g for g in find_groups(model)}
    keep3, keep4 = top("conv_pw_3", 12), top("conv_pw_4", 40)
    assert _weight(pruned, "conv_pw_4", "kernel").shape == (1, 1, 12, 40)
    _assert_sliced(pruned, model, "conv_pw_4", "kernel", np.s_[:, :, keep3], np.s_[..., keep4])
    _assert_sliced(pruned, model, "conv_dw_4", "kernel", np.s_[:, :, keep3])
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        _assert_sliced(pruned, model, "conv_pw_3_bn", name, keep3)
    assert pruned.get_layer("conv_pw_3_bn").output.shape == (None, 8, 8, 12)
    assert _weight(pruned, "conv_preds", "kernel").shape == (1, 1, 100, 10)
    _assert_sliced(pruned, model, "conv_pw_5", "kernel", np.s_[:, :, keep4])
    assert [g.id for g in find_groups(pruned)] == [g.id for g in find_groups(model)]


def test_a_tied_group_is_ranked_by_the_summed_norm_of_its_producers(small_cnn):
    model = keras.models.clone_model(small_cnn)
    model.set_weights(small_cnn.get_weights())
    # Filter c of each producer gets norm exactly scale[c]: uniform entries of that size.
    for layer, scales in (("stem", [8, 7, 6, 5, 4, 3, 2, 1]), ("res_conv", [0, 0, 0, 0, 0, 9, 9, 9])):
        kernel = model.get_layer(layer).kernel
        per_entry = np.asarray(scales, dtype="float32") / np.sqrt(np.prod(kernel.shape[:-1]))
        kernel.assign(np.broadcast_to(per_entry, kernel.shape))
    group = find_groups(model)[0]
    np.testing.assert_allclose(filter_norms(model, group), [8, 7, 6, 5, 4, 12, 11, 10], rtol=1e-6)
    pruned = prune_to_counts(model, {"stem": 4})
    keep = [0, 5, 6, 7]  # the stem alone would keep 0, 1, 2, 3
    _assert_sliced(pruned, model, "stem", "kernel", np.s_[..., keep])
    # res_conv both reads and produces the tied channels.
    _assert_sliced(pruned, model, "res_conv", "kernel", np.s_[:, :, keep], np.s_[..., keep])
    _assert_sliced(pruned, model, "branch_a", "kernel", np.s_[:, :, keep])


def _silence(model, group, channels):
    """Make `channels` of `group` exactly zero wherever they flow (filters, bias, BN shift)."""
    for name in group.producers + group.followers:
        layer = model.get_layer(name)
        for variable in layer.weights:
            value = keras.ops.convert_to_numpy(variable).copy()
            if name in group.producers and variable.name in ("kernel", "pointwise_kernel", "bias"):
                value[..., channels] = 0.0
            elif variable.name in ("beta", "moving_mean", "bias"):  # BN shift, depthwise bias
                value[channels] = 0.0
            variable.assign(value)


@pytest.mark.parametrize("name", ["mobilenet_v2", "small_cnn"])
def test_removing_channels_that_carry_zeros_leaves_the_outputs_unchanged(name, request):
    original = request.getfixturevalue(name)
    model = keras.models.clone_model(original)
    model.set_weights(original.get_weights())
    rng = np.random.default_rng(11)
    counts = {}
    for group in find_groups(model):
        silent = rng.choice(group.size, size=group.size // 2, replace=False)
        _silence(model, group, silent)
        counts[group.id] = group.size - silent.size
    pruned = prune_to_counts(model, counts)  # the silent channels have norm 0: they go
    assert channel_counts(pruned) == counts
    assert pruned.count_params() < 0.5 * model.count_params()
    assert _max_difference(model, pruned, _images(model)) <= 1e-5


def test_explicit_keep_lists_slice_concatenation_and_flatten_consumers(small_cnn):
    keep = {"branch_a": [1, 4], "branch_b": [0, 3], "tail": [2, 5]}
    pruned = prune(small_cnn, keep)
    _assert_sliced(pruned, small_cnn, "proj", "kernel", np.s_[:, :, [1, 4, 6 + 0, 6 + 3]])
    fc_rows = [p * 6 + c for p in range(16) for c in (2, 5)] + [96 + 2, 96 + 5]
    _assert_sliced(pruned, small_cnn, "fc", "kernel", fc_rows)
    assert pruned.get_layer("squeeze").get_config()["target_shape"] == (2,)
    assert _outputs(pruned, _images(small_cnn)).shape == (4, 10)
    assert channel_counts(small_cnn)["tail"] == 6  # the original is left as it was


def _weights_by_layer(model):
    return {
        layer.name: {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights} for layer in model.layers
    }


def test_pruned_weights_are_exactly_the_pruned_models_without_building_it(small_cnn):
    keep = {"stem": [0, 5, 6, 7], "branch_a": [1, 4], "branch_b": [0, 3], "tail": [2, 5]}
    original = _weights_by_layer(small_cnn)
    sliced = pruned_weights(analyze(small_cnn), original, keep)
    expected = _weights_by_layer(prune(small_cnn, keep))
    for layer, weights in expected.items():
        assert sliced.get(layer, {}).keys() == weights.keys(), layer
        for name, value in weights.items():
            assert sliced[layer][name].shape == value.shape, (layer, name)
            np.testing.assert_array_equal(sliced[layer][name], value)
    assert sliced["fc"]["kernel"].shape == (16 * 2 + 2, 16)  # Flatten (4×4 positions) and the squeeze
    # A layer that loses nothing shares the given arrays: no copy per proposal in NetAdapt.
    assert sliced["classifier"]["kernel"] is original["classifier"]["kernel"]
    with pytest.raises(PruningError, match=r"sorted list of distinct integers from 0 to 5"):
        pruned_weights(analyze(small_cnn), original, {"tail": [3, 1]})


def test_a_sequential_model_is_pruned_like_a_functional_one():
    model = _randomized(
        keras.Sequential(
            [
                keras.Input((8, 8, 3)),
                L.Conv2D(6, 3, name="conv"),
                L.BatchNormalization(name="bn"),
                L.ReLU(name="relu"),
                L.Flatten(name="flatten"),
                L.Dense(4, name="out"),
            ]
        )
    )
    pruned = prune(model, {"conv": [0, 2, 5]})
    assert isinstance(pruned, keras.Sequential)
    _assert_sliced(pruned, model, "conv", "kernel", np.s_[..., [0, 2, 5]])
    rows = [p * 6 + c for p in range(36) for c in (0, 2, 5)]
    _assert_sliced(pruned, model, "out", "kernel", rows)
    assert _outputs(pruned, _images(model)).shape == (4, 4)


# --- errors -------------------------------------------------------------------------


class _Scale(L.Layer):
    def call(self, x):
        return 2.0 * x


@pytest.mark.parametrize(
    "make_layer, expected",
    [
        (lambda: L.Conv2D(4, 3, groups=2, name="grouped"), r"'grouped' \(Conv2D\).*groups=2"),
        (lambda: _Scale(name="doubler"), r"'doubler' \(_Scale\) has no pruning rule"),
    ],
)
def test_unsupported_layers_are_named_in_the_error(make_layer, expected):
    inputs = keras.Input((8, 8, 4))
    x = make_layer()(L.Conv2D(4, 1, name="first")(inputs))
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    with pytest.raises(UnsupportedLayerError, match=expected):
        find_groups(model)


def test_a_recurrent_layer_is_named_in_the_error():
    inputs = keras.Input((5, 3))
    model = keras.Model(inputs, L.Dense(2)(L.LSTM(4, name="memory")(L.Dense(6)(inputs))))
    with pytest.raises(PruningError, match=r"'memory' \(LSTM\)"):
        prune(model, {})


@pytest.mark.parametrize(
    "keep, expected",
    [
        ({"nope": [0]}, r"Unknown channel group.*'nope'"),
        ({"tail": [3, 1]}, r"sorted list of distinct integers from 0 to 5"),
        ({"tail": []}, r"non-empty"),
        ({"tail": [0, 6]}, r"from 0 to 5"),
    ],
)
def test_bad_keep_lists_are_refused(small_cnn, keep, expected):
    with pytest.raises(PruningError, match=expected):
        prune(small_cnn, keep)


def test_counts_outside_the_group_are_refused(small_cnn):
    with pytest.raises(PruningError, match=r"integer from 1 to 6. Received: 0"):
        prune_to_counts(small_cnn, {"tail": 0})
