"""Prunable channel groups of a Keras 3 model, in a vocabulary like Torch-Pruning's DepGraph.

A *source* is a set of channels created by one layer: a convolution's filters, a Dense
layer's units, a model input.  The last axis of every tensor in the graph is described
as `Channels`: blocks of segments of sources, so that a channel-axis Concatenate (segments
side by side) and a Flatten (a block repeated H×W times, in NHWC order) stay exact.  An
elementwise merge (Add, Multiply, ...) ties its inputs' sources into one; a layer that
cannot let channels go (a model output, a softmax over channels, a per-channel
normalisation) *fixes* them.  A `ChannelGroup` is a tied set of sources that is not
fixed: the unit that NetAdapt prunes.

Each Keras layer type has one `LayerRule` in `LAYER_RULES`: how channels flow through it
(`propagate`), which weight axes hold its input (`prune_in`) and output (`prune_out`)
channels, which config entry holds its width (`resize`), and which weight ranks its
filters (`norm_weight`).  `adapter.surgery` applies the rules; this module only reads.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import keras
import numpy as np

from adapter.errors import AdapterError
from lut.spec import UnsupportedLayerError  # one class for "phonefit cannot key or prune this layer"

__all__ = [
    "PruningError",
    "UnsupportedLayerError",
    "ChannelGroup",
    "LayerRule",
    "LAYER_RULES",
    "LayerChannels",
    "ModelGraph",
    "analyze",
    "find_groups",
    "rule_for",
]


class PruningError(AdapterError):
    """Root of the errors raised by `adapter` for models, groups and channels it cannot use."""


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together.

    `producers` create the channels (their filters/units *are* the group; more than one
    when an Add ties them), `followers` carry them on their output (BatchNormalization,
    DepthwiseConv2D, activations, padding, pooling, Add, ...), and `consumers` read them
    as input channels: `(layer, offset, scale)` means that channel `c` of the group is
    input position `p * (in_channels // scale) + offset + c` for `p < scale` (`offset`
    comes from a Concatenate, `scale = H*W` from a Flatten before a Dense).
    """

    id: str
    size: int
    producers: tuple[str, ...]
    followers: tuple[str, ...]
    consumers: tuple[tuple[str, int, int], ...]


@dataclasses.dataclass(frozen=True)
class _Segment:
    source: int
    size: int


@dataclasses.dataclass(frozen=True)
class _Block:
    """`scale` repetitions of the segments' channels along the last axis (NHWC flatten)."""

    scale: int
    segments: tuple[_Segment, ...]

    @property
    def width(self) -> int:
        return sum(segment.size for segment in self.segments)


Channels = tuple[_Block, ...]


def _length(channels: Channels) -> int:
    return sum(block.scale * block.width for block in channels)


def _structure(channels: Channels) -> tuple:
    return tuple((b.scale, tuple(s.size for s in b.segments)) for b in channels)


def _segments(channels: Channels) -> Iterator[_Segment]:
    for block in channels:
        yield from block.segments


def _concatenated(parts: list[Channels]) -> Channels:
    blocks: list[_Block] = []
    for block in (b for part in parts for b in part):
        if blocks and blocks[-1].scale == 1 and block.scale == 1:
            blocks[-1] = _Block(1, blocks[-1].segments + block.segments)
        else:
            blocks.append(block)
    return tuple(blocks)


class _Sources:
    """Union-find over channel sources; a root carries the size, fixedness and producers."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.producers: list[list[str]] = []

    def new(self, size: int, producer: str | None = None) -> Channels:
        self._parent.append(len(self._parent))
        self.size.append(size)
        self.fixed.append(producer is None)
        self.producers.append([producer] if producer else [])
        return (_Block(1, (_Segment(len(self._parent) - 1, size),)),)

    def find(self, source: int) -> int:
        while self._parent[source] != source:
            self._parent[source] = self._parent[self._parent[source]]
            source = self._parent[source]
        return source

    def tie(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra
            self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
            self.producers[ra] += self.producers[rb]

    def fix(self, channels: Channels) -> None:
        for segment in _segments(channels):
            self.fixed[self.find(segment.source)] = True


Propagate = Callable[[_Sources, keras.layers.Layer, tuple[Channels, ...], tuple], Channels]


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How one Keras layer type passes channels on and how its weights are sliced.

    `prune_in` / `prune_out`: (weight name, axis) pairs whose axis holds the layer's input
    / output channels.  `resize`: the config entry holding the output width, if any.
    `norm_weight`: the weight whose slices along its last axis are the filters ranked by
    L2 norm (producers only).
    """

    propagate: Propagate
    prune_in: tuple[tuple[str, int], ...] = ()
    prune_out: tuple[tuple[str, int], ...] = ()
    resize: str | None = None
    norm_weight: str | None = None


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
        raise UnsupportedLayerError(
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
        raise UnsupportedLayerError(
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
_WEIGHTED = dict(prune_in=(("kernel", -2),), prune_out=(("kernel", -1), ("bias", -1)))
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

LAYER_RULES: dict[type, LayerRule] = {
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


def rule_for(layer) -> LayerRule:
    """The `LayerRule` of `layer`'s exact type; raises `UnsupportedLayerError` if none."""
    rule = LAYER_RULES.get(type(layer))
    if rule is None:
        supported = ", ".join(sorted(cls.__name__ for cls in LAYER_RULES))
        raise UnsupportedLayerError(
            f"Layer {_describe(layer)} has no pruning rule, so phonefit cannot tell how "
            f"channels flow through it. Expected one of: {supported}. Received: "
            f"{type(layer).__name__}. Rebuild the model without it, or add a LayerRule "
            f"for it to adapter.graph.LAYER_RULES."
        )
    config = layer.get_config() if hasattr(layer, "get_config") else {}
    if config.get("data_format") == "channels_first":
        raise UnsupportedLayerError(
            f"Layer {_describe(layer)} is channels-first; phonefit prunes channels-last "
            "models only. Received: data_format='channels_first'. Rebuild the model "
            "with data_format='channels_last'."
        )
    return rule


@dataclasses.dataclass(frozen=True)
class LayerChannels:
    """One layer of the graph with the channel layout of its inputs and its output."""

    layer: keras.layers.Layer
    rule: LayerRule
    inputs: tuple[Channels, ...]
    output: Channels


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    """The analysed model: its layers in topological order and its prunable groups."""

    layers: tuple[LayerChannels, ...]
    groups: tuple[ChannelGroup, ...]
    _sources: _Sources
    _group_of_root: Mapping[int, str]

    def kept_positions(
        self, channels: Channels, keep: Mapping[str, np.ndarray]
    ) -> np.ndarray | None:
        """Positions along a last axis laid out as `channels` that survive `keep`
        (group id -> kept channel indices); None when nothing there is pruned."""
        find = self._sources.find
        groups = [self._group_of_root.get(find(s.source)) for s in _segments(channels)]
        if not any(group in keep for group in groups):
            return None
        parts, base, groups_left = [], 0, iter(groups)
        for block in channels:
            inner, offset = [], 0
            for segment in block.segments:
                group = next(groups_left)
                kept = keep.get(group) if group is not None else None
                inner.append(offset + (np.arange(segment.size) if kept is None else kept))
                offset += segment.size
            repeats = np.arange(block.scale)[:, None] * block.width
            parts.append(base + (repeats + np.concatenate(inner)[None, :]).ravel())
            base += block.scale * block.width
        return np.concatenate(parts)


def _node_of(tensor):
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index]


def _topological_nodes(model) -> list:
    """The model's graph nodes, inputs first (iterative post-order from the outputs)."""
    if not isinstance(model, keras.Model) or not getattr(model, "outputs", None):
        raise PruningError(
            "Expected a built Functional or Sequential keras.Model (one with inputs and "
            f"outputs). Received: {type(model).__name__}. Subclassed models have no graph "
            "to analyse; build the model functionally."
        )
    order, done = [], set()
    stack = [(_node_of(t), False) for t in reversed(model.outputs)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in done:
            continue
        if expanded:
            done.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((_node_of(t), False) for t in reversed(node.input_tensors))
    return order


def _trace(model) -> tuple[_Sources, list[LayerChannels]]:
    sources, layers, seen = _Sources(), [], set()
    channels_of: dict[int, Channels] = {}
    for node in _topological_nodes(model):
        layer = node.operation
        rule = rule_for(layer)
        if id(layer) in seen or len(node.output_tensors) != 1:
            raise UnsupportedLayerError(
                f"Layer {_describe(layer)} is called more than once or has several "
                "outputs; phonefit prunes graphs whose layers are each called once with "
                "one output. Rebuild the model with one layer per call."
            )
        seen.add(id(layer))
        output = node.output_tensors[0]
        if output.shape[-1] is None:
            raise PruningError(
                f"Layer {_describe(layer)} has an unknown channel count. Expected a "
                f"static last dimension. Received: shape={output.shape}. Give the model "
                "a fully defined input shape."
            )
        inputs = tuple(channels_of[id(t)] for t in node.input_tensors)
        result = rule.propagate(sources, layer, inputs, tuple(output.shape))
        channels_of[id(output)] = result
        layers.append(LayerChannels(layer, rule, inputs, result))
    for tensor in model.outputs:
        sources.fix(channels_of[id(tensor)])
    return sources, layers


def _groups(sources: _Sources, layers: list[LayerChannels]) -> tuple[list[ChannelGroup], dict]:
    roots: dict[int, list[str]] = {}
    for entry in layers:
        for segment in _segments(entry.output):
            root = sources.find(segment.source)
            if not sources.fixed[root] and entry.layer.name in sources.producers[root]:
                roots.setdefault(root, [])
    for entry in layers:
        name = entry.layer.name
        for root, followers in roots.items():
            carries = any(sources.find(s.source) == root for s in _segments(entry.output))
            if carries and name not in sources.producers[root]:
                followers.append(name)
    order = {entry.layer.name: i for i, entry in enumerate(layers)}
    groups = []
    for root, followers in roots.items():
        producers = tuple(sorted(sources.producers[root], key=order.__getitem__))
        consumers = tuple(_consumers(sources, layers, root))
        groups.append(
            ChannelGroup(producers[0], sources.size[root], producers, tuple(followers), consumers)
        )
    return groups, {root: group.id for root, group in zip(roots, groups)}


def _consumers(sources: _Sources, layers: list[LayerChannels], root: int):
    for entry in layers:
        if not entry.rule.prune_in:
            continue
        base = 0
        for block in entry.inputs[0]:
            offset = base
            for segment in block.segments:
                if sources.find(segment.source) == root:
                    yield (entry.layer.name, offset, block.scale)
                offset += segment.size
            base += block.scale * block.width


def analyze(model: keras.Model) -> ModelGraph:
    """Trace `model`'s channels layer by layer and find its prunable groups.

    Raises `UnsupportedLayerError` naming the first layer that has no rule (or an
    unsupported setting), before anything is changed.
    """
    sources, layers = _trace(model)
    groups, group_of_root = _groups(sources, layers)
    return ModelGraph(tuple(layers), tuple(groups), sources, group_of_root)


def find_groups(model: keras.Model) -> list[ChannelGroup]:
    """The prunable channel groups of `model`, in topological order of their first producer.

    Channels that reach a model output (the classifier's units, for one) are never
    prunable, and neither are channels a layer cannot lose (see `LAYER_RULES`).
    """
    return list(analyze(model).groups)
