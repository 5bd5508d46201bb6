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
filters (`norm_weight`).  `adapter.pruning.surgery` applies the rules; this module only reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import keras
import numpy as np

from adapter.pruning.channels import Channels, PruningError, UnprunableLayerError, _segments, _Sources
from adapter.pruning.rules import LAYER_RULES, LayerRule, _describe, rule_for
from lut.keras_graph import node_of
from lut.spec import UnsupportedLayerError  # one class for "phonefit cannot key or prune this layer"

__all__ = [
    "LAYER_RULES",
    "ChannelGroup",
    "LayerChannels",
    "LayerRule",
    "ModelGraph",
    "PruningError",
    "UnprunableLayerError",
    "UnsupportedLayerError",
    "analyze",
    "find_groups",
    "rule_for",
]


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


def _topological_nodes(model) -> list:
    """The model's graph nodes, inputs first (iterative post-order from the outputs)."""
    if not isinstance(model, keras.Model) or not getattr(model, "outputs", None):
        raise PruningError(
            "Expected a built Functional or Sequential keras.Model (one with inputs and "
            f"outputs). Received: {type(model).__name__}. Subclassed models have no graph "
            "to analyse; build the model functionally."
        )
    order, done = [], set()
    stack = [(node_of(t), False) for t in reversed(model.outputs)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in done:
            continue
        if expanded:
            done.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((node_of(t), False) for t in reversed(node.input_tensors))
    return order


def _trace(model) -> tuple[_Sources, list[LayerChannels]]:
    sources, layers, seen = _Sources(), [], set()
    channels_of: dict[int, Channels] = {}
    for node in _topological_nodes(model):
        layer = node.operation
        rule = rule_for(layer)
        if id(layer) in seen or len(node.output_tensors) != 1:
            raise UnprunableLayerError(
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

    Raises `UnprunableLayerError` (an `UnsupportedLayerError`) naming the first layer that has no rule (or an
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
