"""How each Keras layer type computes, for `adapter.training.flex.FlexTrainer`: one forward function per type.

A forward function takes the traced `Node` (its config and name), the layer's weights, its
inputs and the `Pass` (training or not, seed), and returns the layer's output with
TensorFlow ops on weights of any (pruned) size. The functions are the `forward` entries of
the pruning rules (`adapter.pruning.graph.LAYER_RULES`): one table per Keras layer type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

__all__ = ["Forward", "Node", "Pass"]

@dataclasses.dataclass(frozen=True)
class Node:
    """One layer of the traced network: what it computes and from which layers' outputs."""

    name: str
    index: int
    forward: Callable
    config: dict
    inputs: tuple[str, ...]
    trainable: bool


class Pass:
    """One forward pass: training or inference, its random seed (two int32), and where
    BatchNormalization inputs go."""

    def __init__(self, training: bool, seed=None, collect_norm_inputs: bool = False):
        self.training, self.seed = training, seed
        self.norm_inputs: list | None = [] if collect_norm_inputs else None


def _activation(config: dict, x):
    return keras.activations.get(config.get("activation", "linear"))(x)


def _with_bias(config: dict, w: dict, x):
    return x + w["bias"] if config.get("use_bias", False) else x


def conv2d(node: Node, w: dict, xs: list, run: Pass):
    c = node.config
    y = tf.nn.conv2d(xs[0], w["kernel"], c["strides"], c["padding"].upper(), dilations=c["dilation_rate"])
    return _activation(c, _with_bias(c, w, y))


def depthwise_conv2d(node: Node, w: dict, xs: list, run: Pass):
    c = node.config
    strides = (1, *c["strides"], 1)
    y = tf.nn.depthwise_conv2d(xs[0], w["kernel"], strides, c["padding"].upper(), dilations=c["dilation_rate"])
    return _activation(c, _with_bias(c, w, y))


def dense(node: Node, w: dict, xs: list, run: Pass):
    return _activation(node.config, _with_bias(node.config, w, tf.matmul(xs[0], w["kernel"])))


def batch_norm(node: Node, w: dict, xs: list, run: Pass):
    x, c = xs[0], node.config
    if run.norm_inputs is not None:
        run.norm_inputs.append(x)
    if run.training and node.trainable:
        # keras.ops, not tf.nn: Keras' moments stop the gradient through the mean in the
        # variance, and the gradients must be those of the Keras model.
        mean, variance = keras.ops.moments(x, axes=list(range(len(x.shape) - 1)))
    else:
        mean, variance = w["moving_mean"], w["moving_variance"]
    return keras.ops.batch_normalization(
        x, mean, variance, axis=-1, offset=w.get("beta"), scale=w.get("gamma"), epsilon=c["epsilon"]
    )


def relu(node: Node, w: dict, xs: list, run: Pass):
    c = node.config
    return keras.activations.relu(
        xs[0], negative_slope=c["negative_slope"], max_value=c["max_value"], threshold=c["threshold"]
    )


def activation_layer(node: Node, w: dict, xs: list, run: Pass):
    return _activation(node.config, xs[0])


def zero_padding2d(node: Node, w: dict, xs: list, run: Pass):
    (top, bottom), (left, right) = node.config["padding"]
    return tf.pad(xs[0], [[0, 0], [top, bottom], [left, right], [0, 0]])


def global_average_pooling2d(node: Node, w: dict, xs: list, run: Pass):
    return tf.reduce_mean(xs[0], axis=[1, 2], keepdims=node.config["keepdims"])


def pooling2d(reduce: Callable) -> Callable:
    def forward(node: Node, w: dict, xs: list, run: Pass):
        c = node.config
        return reduce(xs[0], c["pool_size"], c["strides"] or c["pool_size"], c["padding"].upper())

    return forward


def dropout(node: Node, w: dict, xs: list, run: Pass):
    rate = node.config["rate"]
    if not run.training or rate == 0 or run.seed is None:
        return xs[0]
    # Stateless: a step's dropout depends on (seed, step, layer) only, so runs repeat exactly.
    return tf.nn.experimental.stateless_dropout(xs[0], rate, seed=run.seed + tf.constant([0, node.index * 7919]))


def reshape(node: Node, w: dict, xs: list, run: Pass):
    # The last entry of the target is the channel axis, whose width pruning may change
    # (as adapter.pruning.surgery resizes it); every other entry stays as configured.
    target = list(node.config["target_shape"])
    if -1 not in target[:-1]:
        target[-1] = -1
    return tf.reshape(xs[0], [tf.shape(xs[0])[0], *target])


def flatten(node: Node, w: dict, xs: list, run: Pass):
    return tf.reshape(xs[0], [tf.shape(xs[0])[0], -1])


def add(node: Node, w: dict, xs: list, run: Pass):
    return tf.add_n(xs)


def concatenate(node: Node, w: dict, xs: list, run: Pass):
    return tf.concat(xs, axis=node.config["axis"])


def identity(node: Node, w: dict, xs: list, run: Pass):
    return xs[0]




Forward = Callable[[Node, dict[str, Any], list[Any], Pass], Any]  # (node, weights, inputs, pass) -> output
