"""Prune Keras CNNs to a device's latency budget, NetAdapt-style."""
from lut.quiet_tf import import_tensorflow_quietly

import_tensorflow_quietly()  # the adapter needs Keras; load it without TensorFlow's chatter

# ruff: noqa: E402
from adapter.graph import ChannelGroup, PruningError, UnsupportedLayerError, find_groups
from adapter.surgery import channel_counts, filter_norms, prune, prune_to_counts, pruned_weights

__all__ = [
    "ChannelGroup",
    "PruningError",
    "UnsupportedLayerError",
    "channel_counts",
    "filter_norms",
    "find_groups",
    "prune",
    "prune_to_counts",
    "pruned_weights",
]
