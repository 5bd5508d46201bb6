"""One rule per Keras layer type: how channels flow through it, how its weights are sliced, how it computes.

`LAYER_RULES[type]` is a `LayerRule`: `propagate` (channels in → channels out),
`prune_in`/`prune_out` (the weight axes holding input/output channels), `resize` (the config
entry holding the width), `norm_weight` (the weight whose filters are ranked) and `forward`
(the computation `adapter.training.flex.FlexTrainer` runs, for the types it trains).
`adapter.pruning.graph` reads the rules, `adapter.pruning.surgery` applies them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from adapter.pruning.channels import (
    Channels,
    UnprunableLayerError,
    _Block,
    _concatenated,
    _length,
    _segments,
    _Sources,
    _structure,
)
from adapter.training import forward as fw
from adapter.training.forward import Forward

__all__ = ["LAYER_RULES", "LayerRule", "Propagate", "rule_for"]


Propagate = Callable[[_Sources, keras.layers.Layer, tuple[Channels, ...], tuple], Channels]


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How one Keras layer type passes channels on and how its weights are sliced.

    `prune_in` / `prune_out`: (weight name, axis) pairs whose axis holds the layer's input
    / output channels.  `resize`: the config entry holding the output width, if any.
    `norm_weight`: the weight whose slices along its last axis are the filters ranked by
    L2 norm (producers only). `forward`: the layer's computation on weights of any pruned
    size (`adapter.training.forward`), for the layer types `FlexTrainer` trains.
    """

    propagate: Propagate
    prune_in: tuple[tuple[str, int], ...] = ()
    prune_out: tuple[tuple[str, int], ...] = ()
    resize: str | None = None
    norm_weight: str | None = None
    forward: Forward | None = None  # how `adapter.training.flex.FlexTrainer` computes the layer (None: it cannot)


def _describe(layer) -> str:
    return f"'{layer.name}' ({type(layer).__name__})"


def _input(sources, layer, inputs, out_shape) -> Channels:
    return sources.new(out_shape[-1])


def _follow(sources, layer, inputs, out_shape) -> Channels:
    return inputs[0]


def _follow_fixed(sources, layer, inputs, out_shape) -> Channels:
    # Output channel c is still input channel c, but the layer mixes or normalises
    # across channels (or holds per-channel constants), so none of them may go.
    sources.fix(inputs[0])
    return inputs[0]


def _opaque(sources, inputs, out_shape) -> Channels:
    for channels in inputs:
        sources.fix(channels)
    return sources.new(out_shape[-1])


def _produce(sources, layer, inputs, out_shape) -> Channels:
    return sources.new(out_shape[-1], producer=layer.name)


def _convolution(sources, layer, inputs, out_shape) -> Channels:
    groups = layer.get_config().get("groups", 1)
    if groups != 1:
        raise UnprunableLayerError(
            f"Layer {_describe(layer)} is a grouped convolution; phonefit can only prune "
            f"convolutions with groups=1. Received: groups={groups}. Rebuild the model "
            "with groups=1 (or a DepthwiseConv2D for groups equal to the channels)."
        )
    return _produce(sources, layer, inputs, out_shape)


def _depthwise(sources, layer, inputs, out_shape) -> Channels:
    if layer.get_config()["depth_multiplier"] == 1:
        return inputs[0]
    return _opaque(sources, inputs, out_shape)


def _separable(sources, layer, inputs, out_shape) -> Channels:
    if layer.get_config()["depth_multiplier"] != 1:
        sources.fix(inputs[0])
    return _produce(sources, layer, inputs, out_shape)


def _batch_norm(sources, layer, inputs, out_shape) -> Channels:
    axis = layer.get_config()["axis"]
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if axes not in ([-1], [len(out_shape) - 1]):
        raise UnprunableLayerError(
            f"Layer {_describe(layer)} normalises axis {axis}; phonefit expects the channel "
            f"axis, axis=-1. Received: axis={axis}. Use channels-last BatchNormalization."
        )
    return inputs[0]


def _activation(sources, layer, inputs, out_shape) -> Channels:
    if layer.get_config()["activation"] in ("softmax", "log_softmax"):
        return _follow_fixed(sources, layer, inputs, out_shape)
    return inputs[0]


def _rescaling(sources, layer, inputs, out_shape) -> Channels:
    config = layer.get_config()
    if all(np.ndim(config[key]) == 0 for key in ("scale", "offset")):
        return inputs[0]
    return _follow_fixed(sources, layer, inputs, out_shape)


def _tie(sources, layer, inputs, out_shape) -> Channels:
    # Inputs of width 1 broadcast over the channels and are not tied to them.
    full = [channels for channels in inputs if _length(channels) == out_shape[-1]]
    first = full[0]
    if all(_structure(channels) == _structure(first) for channels in full):
        for channels in full[1:]:
            for a, b in zip(_segments(first), _segments(channels)):
                sources.tie(a.source, b.source)
    else:
        for channels in full:
            sources.fix(channels)
    return first


def _concatenate(sources, layer, inputs, out_shape) -> Channels:
    axis = layer.get_config()["axis"]
    if axis in (-1, len(out_shape) - 1):
        return _concatenated(list(inputs))
    return _tie(sources, layer, inputs, out_shape)


def _reshape(sources, layer, inputs, out_shape) -> Channels:
    # In NHWC order channel c sits at every position p*C + c, so any reshape whose last
    # axis is a multiple of C keeps channel c at positions q*C + c (Flatten included).
    channels = inputs[0]
    if out_shape[-1] == _length(channels):
        return channels
    if len(channels) == 1 and out_shape[-1] % channels[0].width == 0:
        return (_Block(out_shape[-1] // channels[0].width, channels[0].segments),)
    return _opaque(sources, inputs, out_shape)


_L = keras.layers


_WEIGHTED: dict[str, Any] = dict(prune_in=(("kernel", -2),), prune_out=(("kernel", -1), ("bias", -1)))


_CONV = LayerRule(_convolution, resize="filters", norm_weight="kernel", **_WEIGHTED)


_DEPTHWISE = LayerRule(_depthwise, prune_out=(("kernel", -2), ("bias", -1)))


_SEPARABLE = LayerRule(
    _separable,
    prune_in=(("depthwise_kernel", -2), ("pointwise_kernel", -2)),
    prune_out=(("pointwise_kernel", -1), ("bias", -1)),
    resize="filters",
    norm_weight="pointwise_kernel",
)


_BN_WEIGHTS = tuple((name, -1) for name in ("gamma", "beta", "moving_mean", "moving_variance"))


_PASS = LayerRule(_follow)


_TIE = LayerRule(_tie)


_LAYER_RULES: dict[type, LayerRule] = {
    _L.InputLayer: LayerRule(_input),
    _L.Conv1D: _CONV,
    _L.Conv2D: _CONV,
    _L.Conv3D: _CONV,
    _L.Dense: LayerRule(_produce, resize="units", norm_weight="kernel", **_WEIGHTED),
    _L.DepthwiseConv1D: _DEPTHWISE,
    _L.DepthwiseConv2D: _DEPTHWISE,
    _L.SeparableConv1D: _SEPARABLE,
    _L.SeparableConv2D: _SEPARABLE,
    _L.BatchNormalization: LayerRule(_batch_norm, prune_out=_BN_WEIGHTS),
    _L.Activation: LayerRule(_activation),
    _L.Softmax: LayerRule(_follow_fixed),
    _L.Normalization: LayerRule(_follow_fixed),
    _L.Rescaling: LayerRule(_rescaling),
    _L.Concatenate: LayerRule(_concatenate),
    _L.Flatten: LayerRule(_reshape),
    _L.Reshape: LayerRule(_reshape, resize="target_shape"),
    **{cls: _TIE for cls in (_L.Add, _L.Subtract, _L.Multiply, _L.Average, _L.Maximum, _L.Minimum)},
    **{
        cls: _PASS
        for cls in (
            _L.ReLU, _L.LeakyReLU, _L.ELU, _L.Identity, _L.ActivityRegularization,
            _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D,
            _L.GaussianNoise, _L.GaussianDropout, _L.AlphaDropout,
            _L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D,
            _L.Cropping1D, _L.Cropping2D, _L.Cropping3D,
            _L.UpSampling1D, _L.UpSampling2D, _L.UpSampling3D,
            _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D,
            _L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D,
            _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D,
            _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D,
        )
    },
}


# How FlexTrainer computes each layer type it trains: the `forward` of that type's rule.
_FORWARDS: dict[type, Forward] = {
    _L.InputLayer: fw.identity,
    _L.Conv2D: fw.conv2d,
    _L.DepthwiseConv2D: fw.depthwise_conv2d,
    _L.Dense: fw.dense,
    _L.BatchNormalization: fw.batch_norm,
    _L.ReLU: fw.relu,
    _L.Activation: fw.activation_layer,
    _L.ZeroPadding2D: fw.zero_padding2d,
    _L.GlobalAveragePooling2D: fw.global_average_pooling2d,
    _L.MaxPooling2D: fw.pooling2d(tf.nn.max_pool2d),
    _L.AveragePooling2D: fw.pooling2d(tf.nn.avg_pool2d),
    _L.Dropout: fw.dropout,
    _L.Reshape: fw.reshape,
    _L.Flatten: fw.flatten,
    _L.Add: fw.add,
    _L.Concatenate: fw.concatenate,
}


# One table per Keras layer type: how channels flow, how weights are sliced, how it computes.
LAYER_RULES: dict[type, LayerRule] = {
    cls: dataclasses.replace(rule, forward=_FORWARDS[cls]) if cls in _FORWARDS else rule
    for cls, rule in _LAYER_RULES.items()
}
assert set(_FORWARDS) <= set(LAYER_RULES), "every layer type FlexTrainer computes has a pruning rule"


def rule_for(layer) -> LayerRule:
    """The `LayerRule` of `layer`'s exact type; raises `UnprunableLayerError` if none."""
    rule = LAYER_RULES.get(type(layer))
    if rule is None:
        supported = ", ".join(sorted(cls.__name__ for cls in LAYER_RULES))
        raise UnprunableLayerError(
            f"Layer {_describe(layer)} has no pruning rule, so phonefit cannot tell how "
            f"channels flow through it. Expected one of: {supported}. Received: "
            f"{type(layer).__name__}. Rebuild the model without it, or add a LayerRule "
            f"for it to adapter.pruning.graph.LAYER_RULES."
        )
    config = layer.get_config() if hasattr(layer, "get_config") else {}
    if config.get("data_format") == "channels_first":
        raise UnprunableLayerError(
            f"Layer {_describe(layer)} is channels-first; phonefit prunes channels-last "
            "models only. Received: data_format='channels_first'. Rebuild the model "
            "with data_format='channels_last'."
        )
    return rule
