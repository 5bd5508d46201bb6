"""Prune Keras CNNs to a device's latency budget, NetAdapt-style.

The names below load on first use (PEP 562), so `python -m adapter.X --help` and argument
errors answer before TensorFlow loads; the first use loads it without its chatter.
"""
from __future__ import annotations

import importlib

__all__ = [
    "ChannelGroup",
    "PruningError",
    "UnprunableLayerError",
    "UnsupportedLayerError",
    "channel_counts",
    "filter_norms",
    "find_groups",
    "prune",
    "prune_to_counts",
    "pruned_weights",
]

_HOMES = {
    "ChannelGroup": "adapter.pruning.graph",
    "PruningError": "adapter.pruning.graph",
    "UnsupportedLayerError": "adapter.pruning.graph",
    "UnprunableLayerError": "adapter.pruning.graph",
    "find_groups": "adapter.pruning.graph",
    "channel_counts": "adapter.pruning.surgery",
    "filter_norms": "adapter.pruning.surgery",
    "prune": "adapter.pruning.surgery",
    "prune_to_counts": "adapter.pruning.surgery",
    "pruned_weights": "adapter.pruning.surgery",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'adapter' has no attribute {name!r}")
    from lut.quiet_tf import import_tensorflow_quietly

    import_tensorflow_quietly()  # the adapter needs Keras; load it without TensorFlow's chatter
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
