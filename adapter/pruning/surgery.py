"""Structured pruning of Keras 3 models: remove whole channels, copy every other weight.

`prune` physically shrinks the model (the result is a smaller Keras model, not a mask):
each layer's config is edited (`filters`, `units`, a Reshape's `target_shape`) and the
model re-built with `keras.models.clone_model(clone_function=...)`; then each remaining
weight is copied from the original, sliced along the axes `adapter.pruning.graph.LAYER_RULES`
names.  Group ids are the names of the groups' first producers, so they stay the same
from one pruned model to the next.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np

from adapter.pruning.graph import ChannelGroup, LayerChannels, ModelGraph, PruningError, analyze, rule_for
from lut.keras_graph import producer_of

__all__ = ["filter_norms", "prune", "prune_to_counts", "pruned_weights", "channel_counts"]


def channel_counts(model: keras.Model) -> dict[str, int]:
    """Group id -> current number of channels, for every prunable group of `model`."""
    return {group.id: group.size for group in analyze(model).groups}


def filter_norms(model: keras.Model, group: ChannelGroup) -> np.ndarray:
    """L2 norm of each of `group`'s filters, summed over the producers of a tied group."""
    total = np.zeros(group.size)
    for name in group.producers:
        try:
            layer = model.get_layer(name)
        except ValueError as e:
            raise PruningError(
                f"Group {group.id!r} names producer {name!r}, which the model does not "
                "have. Expected a group found in this model. Call find_groups(model) "
                "again after each prune."
            ) from e
        rule = rule_for(layer)
        assert rule.norm_weight is not None  # a producer's rule names the weight its filters are ranked by
        kernel = keras.ops.convert_to_numpy(_variable(layer, rule.norm_weight))
        if kernel.shape[-1] != group.size:
            raise PruningError(
                f"Group {group.id!r} is stale: layer {name!r} has {kernel.shape[-1]} "
                f"filters, the group says {group.size}. Call find_groups(model) again "
                "after each prune."
            )
        total += np.sqrt(np.square(kernel.reshape(-1, kernel.shape[-1])).sum(axis=0))
    return total


def prune(model: keras.Model, keep: Mapping[str, Sequence[int]]) -> keras.Model:
    """A copy of `model` keeping only the listed channels of each named group.

    `keep` maps group id (see `find_groups`) to the sorted indices of the channels to
    keep; groups left out keep all their channels.  The original model is not changed.
    """
    graph = analyze(model)
    return _rebuild(model, graph, _validated_keep(graph, keep))


def pruned_weights(
    graph: ModelGraph,
    weights: Mapping[str, Mapping[str, np.ndarray]],
    keep: Mapping[str, Sequence[int]],
) -> dict[str, dict[str, np.ndarray]]:
    """The weights `prune(model, keep)` would give, without building the pruned model.

    `graph` is `analyze(model)`; `weights` maps layer name -> weight name -> array (as
    `adapter.training.flex.model_weights` returns them); `keep` is as for `prune`.  Each array is
    sliced exactly as `prune` slices it; layers that lose nothing share the given arrays.
    """
    return _sliced_weights(graph, weights, _validated_keep(graph, keep))


def prune_to_counts(model: keras.Model, counts: Mapping[str, int]) -> keras.Model:
    """A copy of `model` keeping the `count` filters of largest L2 norm in each named group."""
    graph = analyze(model)
    groups = _groups_by_id(graph, counts, "counts")
    keep = {}
    for group_id, count in counts.items():
        size = groups[group_id].size
        is_integer = isinstance(count, (int, np.integer)) and not isinstance(count, bool)
        if not is_integer or not 1 <= count <= size:
            raise PruningError(
                f"The channel count of group {group_id!r} must be an integer from 1 to "
                f"{size}. Received: {count!r}. Pass how many channels to keep."
            )
        ranking = np.argsort(-filter_norms(model, groups[group_id]), kind="stable")
        keep[group_id] = np.sort(ranking[:count])
    return _rebuild(model, graph, keep)


def _groups_by_id(graph: ModelGraph, mapping, what: str) -> dict[str, ChannelGroup]:
    groups = {group.id: group for group in graph.groups}
    if not isinstance(mapping, Mapping):
        raise PruningError(
            f"`{what}` must be a mapping from group id to channels. Received: "
            f"{type(mapping).__name__}. Take group ids from find_groups(model)."
        )
    unknown = [key for key in mapping if key not in groups]
    if unknown:
        raise PruningError(
            f"Unknown channel group(s) in `{what}`. Expected ids from find_groups(model): "
            f"{sorted(groups)}. Received: {unknown}."
        )
    return groups


def _validated_keep(graph: ModelGraph, keep) -> dict[str, np.ndarray]:
    groups = _groups_by_id(graph, keep, "keep")
    checked = {}
    for group_id, indices in keep.items():
        size = groups[group_id].size
        kept = np.asarray(indices)
        if (
            kept.ndim != 1
            or kept.size == 0
            or not np.issubdtype(kept.dtype, np.integer)
            or np.any(np.diff(kept) <= 0)
            or kept[0] < 0
            or kept[-1] >= size
        ):
            raise PruningError(
                f"The channels to keep of group {group_id!r} must be a non-empty, sorted "
                f"list of distinct integers from 0 to {size - 1}. Received: {indices!r}."
            )
        if kept.size < size:
            checked[group_id] = kept.astype(np.int64)
    return checked


def _rebuild(model: keras.Model, graph: ModelGraph, keep: Mapping[str, np.ndarray]) -> keras.Model:
    configs = {entry.layer.name: _pruned_config(graph, entry, keep) for entry in graph.layers}
    original = {
        entry.layer.name: {v.name: keras.ops.convert_to_numpy(v) for v in entry.layer.weights}
        for entry in graph.layers
    }
    weights = _sliced_weights(graph, original, keep)
    # clone_model names a Functional model's new inputs after their tensors; keep the
    # layer names (a Sequential model keeps them by itself).
    inputs = None
    if not isinstance(model, keras.Sequential):
        inputs = keras.tree.map_structure(_same_input, model.input)
    pruned = keras.models.clone_model(
        model,
        input_tensors=inputs,
        clone_function=lambda layer: type(layer).from_config(configs[layer.name]),
    )
    for layer in pruned.layers:
        _assign(layer, weights.get(layer.name, {}))
    return pruned


def _same_input(tensor):
    layer = producer_of(tensor)
    return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=layer.name)


def _pruned_config(graph: ModelGraph, entry: LayerChannels, keep) -> dict:
    """The layer's config, edited for the channels it keeps."""
    config = entry.layer.get_config()
    if entry.rule.resize:
        out_positions = graph.kept_positions(entry.output, keep)
        if out_positions is not None:
            config[entry.rule.resize] = _resized(config[entry.rule.resize], len(out_positions))
    return config


def _sliced_weights(graph: ModelGraph, weights, keep: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """`pruned_weights` for a `keep` already validated."""
    sliced = {}
    for entry in graph.layers:
        name, rule = entry.layer.name, entry.rule
        values = weights.get(name, {})
        out_positions = graph.kept_positions(entry.output, keep)
        in_positions = graph.kept_positions(entry.inputs[0], keep) if rule.prune_in else None
        if values and (out_positions is not None or in_positions is not None):
            values = dict(values)
            for positions, axes in ((in_positions, rule.prune_in), (out_positions, rule.prune_out)):
                for weight, axis in axes if positions is not None else ():
                    if weight in values and positions is not None:
                        values[weight] = np.take(values[weight], positions, axis=axis)
        sliced[name] = values
    return sliced


def _resized(setting, width: int):
    if isinstance(setting, (tuple, list)):
        # A Reshape target: its last entry is the channel axis (-1 lets Keras infer it).
        return tuple(setting[:-1]) + ((setting[-1] if setting[-1] == -1 else width),)
    return width


def _variable(layer, name: str):
    for variable in layer.weights:
        if variable.name == name:
            return variable
    raise PruningError(
        f"Layer '{layer.name}' ({type(layer).__name__}) has no weight {name!r}. Expected "
        f"one of its weights to be {name!r}. Received weights: "
        f"{[v.name for v in layer.weights]}. Build the layer before pruning."
    )


def _assign(layer, values: Mapping[str, np.ndarray]) -> None:
    for variable in layer.weights:
        value = values.get(variable.name)
        if value is None or tuple(variable.shape) != value.shape:
            raise PruningError(
                f"Cannot copy weight {variable.name!r} of layer '{layer.name}' "
                f"({type(layer).__name__}): the pruned layer expects shape "
                f"{tuple(variable.shape)}, the sliced original has "
                f"{None if value is None else value.shape}. The layer holds a weight "
                "phonefit does not know how to slice; remove it or extend its LayerRule."
            )
        variable.assign(value)
