"""Measurement plans: every spec a model can have after filter pruning, on a channel grid.

Pruning changes the number of filters of Conv2D/Dense layers that do not produce a model
output.  Which spec fields follow those filter counts is found by asking `lut.specs_of`
for the model with every prunable layer one filter smaller and comparing spec by spec:
a field that changes is free (it takes every value on the grid), one that does not is
fixed (the model's input channels, the class count).
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from typing import Any  # Keras models: Keras ships no types

from lut.keras_graph import inbound_layers, layers_in_order, producer_of
from lut.keras_specs import channel_slopes, specs_of_keras
from lut.spec import CHANNEL_PRESERVING_OPS, LayerSpec
from profiler.errors import ProfilerError

__all__ = ["channel_grid", "plan_specs", "prunable_layers"]



def channel_grid(channels: int, step: int) -> list[int]:
    """Multiples of `step` up to `channels`, and `channels` itself."""
    if not isinstance(step, int) or step < 1:
        raise ProfilerError(f"`step` must be a positive integer. Received: step={step!r}.")
    return sorted({*range(step, channels + 1, step), channels})


def prunable_layers(model: Any) -> list[str]:
    """Conv2D/Dense layers whose filter count pruning may change.

    Excluded are the classifier layers: those whose channels reach a model output through
    channel-preserving layers only (activations, reshape, dropout, add …).
    """
    classifier, stack = set(), [producer_of(t) for t in model.outputs]
    while stack:
        layer = stack.pop()
        if type(layer).__name__ in ("Conv2D", "Dense"):
            classifier.add(layer.name)
        elif type(layer).__name__ != "InputLayer":
            stack.extend(inbound_layers(layer))
    return [
        layer.name
        for layer in layers_in_order(model)
        if type(layer).__name__ in ("Conv2D", "Dense") and layer.name not in classifier
    ]


def _free_fields(model: Any, dtype: str) -> list[tuple[LayerSpec, bool, bool]]:
    """Each spec of the model with whether its cin and its cout follow pruning."""
    shrunk_filters = {}
    for name in prunable_layers(model):
        cfg = model.get_layer(name).get_config()
        shrunk_filters[name] = cfg.get("filters", cfg.get("units")) - 1
    specs_of = functools.partial(specs_of_keras, dtype=dtype)
    original, slopes = channel_slopes(model, {"every prunable layer": shrunk_filters}, specs_of)
    free = {i: (d_in != 0, d_out != 0) for i, d_in, d_out in slopes["every prunable layer"]}
    return [(spec, *free.get(i, (False, False))) for i, spec in enumerate(original)]


def _variants(spec: LayerSpec, free_cin: bool, free_cout: bool, step: int) -> Iterable[LayerSpec]:
    cins = channel_grid(spec.cin, step) if free_cin else [spec.cin]
    if spec.op in CHANNEL_PRESERVING_OPS or (spec.op == "reshape" and spec.cin == spec.cout):
        return (spec.replace(cin=c, cout=c) for c in cins)
    if spec.op == "reshape":  # a Flatten: every input element becomes a feature
        return (spec.replace(cin=c, cout=spec.h * spec.w * c) for c in cins)
    couts = channel_grid(spec.cout, step) if free_cout else [spec.cout]
    return (spec.replace(cin=a, cout=b) for a, b in itertools.product(cins, couts))


def plan_specs(models: Iterable[Any], step: int, dtype: str = "float32") -> list[LayerSpec]:
    """All specs to measure for `models` converted for `dtype`, deduplicated across layers and
    models, in model order."""
    channel_grid(1, step)  # validates step
    planned: dict[str, LayerSpec] = {}
    for model in models:
        for spec, free_cin, free_cout in _free_fields(model, dtype):
            for variant in _variants(spec, free_cin, free_cout, step):
                planned.setdefault(variant.key, variant)
    return list(planned.values())
