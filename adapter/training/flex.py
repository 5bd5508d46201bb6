"""Fine-tune physically pruned variants of one network without rebuilding or retracing it.

NetAdapt fine-tunes one proposal per prunable group in every iteration: each proposal is
the same topology with fewer channels somewhere. Building each one as a Keras model
(`keras.models.clone_model`) and training it with `model.fit` costs a graph trace per
proposal, several seconds, more than its 50 training steps on a small model.
`FlexTrainer` traces its training step once per topology, with every weight held in a
`tf.Variable` of unspecified shape, and trains a pruned variant by assigning its
(physically smaller) weights: the computation is the pruned network's, never a masked
full one, and the same weights in a Keras model give the same outputs.

Each supported Keras layer type has one forward function (`adapter.training.forward`), the `forward`
of its pruning rule in `adapter.pruning.graph.LAYER_RULES`. A model with another layer type, a
regularizer or a constraint is not supported (`unsupported_layers` names them); callers then
train with Keras itself.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from adapter.errors import AdapterError
from adapter.pruning.graph import LAYER_RULES
from adapter.training import forward as fw
from adapter.training.forward import Forward, Node, Pass
from lut.keras_graph import inbound_layers, layers_in_order, producer_of

__all__ = ["FlexTrainer", "model_weights", "unsupported_layers"]

Weights = dict[str, dict[str, np.ndarray]]  # layer name -> weight name -> value


def _forward_of(layer) -> Forward | None:
    rule = LAYER_RULES.get(type(layer))
    return rule.forward if rule is not None else None


def _node(index: int, layer) -> Node:
    forward = _forward_of(layer)
    assert forward is not None  # unsupported_layers found none without one
    inputs = () if isinstance(layer, keras.layers.InputLayer) else _inbound_names(layer)
    return Node(layer.name, index, forward, layer.get_config(), inputs, layer.trainable)


def _why_unsupported(layer) -> str | None:
    if _forward_of(layer) is None:
        return f"{layer.name} ({type(layer).__name__})"
    config = layer.get_config()
    extras = [k for k, v in config.items() if k.endswith(("_regularizer", "_constraint")) and v is not None]
    if extras or config.get("groups", 1) != 1 or config.get("data_format") == "channels_first":
        return f"{layer.name} ({type(layer).__name__} with {', '.join(extras) or 'groups or channels_first'})"
    if isinstance(layer, keras.layers.BatchNormalization) and (config["renorm"] or config["axis"] not in (-1, [-1], 3, [3])):
        return f"{layer.name} (BatchNormalization with renorm or a non-channel axis)"
    return None


def unsupported_layers(model) -> list[str]:
    """The layers of `model` `FlexTrainer` cannot train (empty when it can train them all)."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return [f"{model.name} (a model with {len(model.inputs)} inputs and {len(model.outputs)} outputs)"]
    return [why for layer in model.layers if (why := _why_unsupported(layer)) is not None]


def model_weights(model) -> Weights:
    """Every weight of `model` as numpy arrays, by layer name and weight name."""
    return {
        layer.name: {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights}
        for layer in model.layers
    }


def _any_size(variable) -> tf.TensorShape:
    """The shape of a variable that takes values of any size but the same rank."""
    return tf.TensorShape([None] * len(variable.shape))


def _inbound_names(layer) -> tuple[str, ...]:
    return tuple(parent.name for parent in inbound_layers(layer))


class FlexTrainer:
    """Train, recalibrate and evaluate any channel-pruned variant of `model`'s topology.

    `load` assigns a variant's weights (`model_weights` of it, or sliced arrays); `fit`
    trains them with sparse categorical cross-entropy (Adam or Nesterov SGD, updates as
    Keras computes them, learning rate on a cosine from `lr` to 0); `recalibrate` sets
    the BatchNormalization statistics to those of given images (as
    `adapter.train.recalibrate_batchnorm` does); `accuracy` evaluates; `weights` returns
    the trained arrays, to be assigned to the pruned Keras model of the same variant.
    """

    def __init__(self, model, *, optimizer: str = "adam"):
        unsupported = unsupported_layers(model)
        if unsupported:
            raise AdapterError(
                f"FlexTrainer supports the layers {sorted(t.__name__ for t, r in LAYER_RULES.items() if r.forward)} without "
                f"regularizers or constraints; received {', '.join(unsupported)}."
            )
        if optimizer not in _UPDATES:
            raise AdapterError(f"Unknown optimizer {optimizer!r}: expected one of {sorted(_UPDATES)}.")
        self._update = _UPDATES[optimizer]
        self._nodes = [_node(index, layer) for index, layer in enumerate(layers_in_order(model))]
        self._input_name = producer_of(model.inputs[0]).name
        self._output_name = producer_of(model.outputs[0]).name
        self._variables = {
            layer.name: {
                v.name: tf.Variable(keras.ops.convert_to_numpy(v), shape=_any_size(v),
                                    trainable=v.trainable and layer.trainable, name=f"{layer.name}_{v.name}")
                for v in layer.weights
            }
            for layer in model.layers
        }
        self._trainable = [v for per_layer in self._variables.values() for v in per_layer.values() if v.trainable]
        self._slots = [
            [tf.Variable(tf.zeros_like(v), shape=_any_size(v), trainable=False) for v in self._trainable]
            for _ in range(2)
        ]
        self._build_functions(tuple(model.inputs[0].shape[1:]))

    def _build_functions(self, input_shape: tuple) -> None:
        image = tf.TensorSpec((None, *input_shape), tf.float32)
        self._train_step = tf.function(
            self._step,
            autograph=False,
            input_signature=[image, tf.TensorSpec((None,), tf.int32), tf.TensorSpec((), tf.float32),
                             tf.TensorSpec((), tf.float32), tf.TensorSpec((2,), tf.int32)],
        )
        self._predict = tf.function(
            lambda x: self._forward(x, Pass(training=False)), input_signature=[image], autograph=False
        )
        self._norm_moments = tf.function(self._batch_norm_moments, input_signature=[image], autograph=False)

    def _forward(self, x, run: Pass):
        outputs = {self._input_name: x}
        for node in self._nodes:
            if node.name == self._input_name:
                continue
            inputs = [outputs[name] for name in node.inputs]
            outputs[node.name] = node.forward(node, self._variables.get(node.name, {}), inputs, run)
        return outputs[self._output_name]

    def _step(self, x, y, lr, iteration, seed):
        with tf.GradientTape() as tape:
            probabilities = self._forward(x, Pass(training=True, seed=seed))
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, probabilities))
        gradients = tape.gradient(loss, self._trainable)
        for variable, gradient, first, second in zip(self._trainable, gradients, *self._slots):
            self._update(variable, gradient, first, second, lr, iteration)
        return loss

    def _batch_norm_moments(self, x):
        run = Pass(training=True, collect_norm_inputs=True)
        self._forward(x, run)
        moments = []
        for value in run.norm_inputs:
            axes = list(range(len(value.shape) - 1))
            count = tf.cast(tf.reduce_prod(tf.shape(value)[:-1]), tf.float64)
            value = tf.cast(value, tf.float64)
            moments.append((tf.reduce_sum(value, axes), tf.reduce_sum(tf.square(value), axes), count))
        return moments

    # ---------------------------------------------------------------- public

    def load(self, weights: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Assign a variant's weights (every weight of every layer) and reset the optimizer."""
        for layer_name, per_layer in self._variables.items():
            for weight_name, variable in per_layer.items():
                try:
                    variable.assign(weights[layer_name][weight_name])
                except KeyError as e:
                    raise AdapterError(
                        f"FlexTrainer.load needs every weight of the topology; received none for "
                        f"{layer_name}/{weight_name}."
                    ) from e
        for slots in self._slots:
            for slot, variable in zip(slots, self._trainable):
                slot.assign(tf.zeros_like(variable))

    def fit(self, x: np.ndarray, y: np.ndarray, *, batch_size: int, lr: float, seed: int = 0) -> float:
        """One pass over `x`, `y` in order, in batches of `batch_size`; the last batch's loss.

        Dropout draws from (`seed`, step): the same call on the same weights repeats exactly.
        """
        steps = len(x) // batch_size
        if steps < 1 or len(x) != len(y):
            raise AdapterError(
                f"fit needs at least one batch of {batch_size} images with one label each; "
                f"received {len(x)} images and {len(y)} labels."
            )
        y = y.astype(np.int32, copy=False)
        loss = math.nan
        for step in range(steps):
            rate = 0.5 * lr * (1 + math.cos(math.pi * step / steps))  # keras CosineDecay at `step`
            batch = slice(step * batch_size, (step + 1) * batch_size)
            loss = self._train_step(
                x[batch], y[batch], np.float32(rate), np.float32(step + 1), np.array([seed, step], np.int32)
            )
        return float(loss)

    def recalibrate(self, x: np.ndarray, *, batch_size: int = 256) -> None:
        """Set BatchNormalization statistics to the exact per-channel mean and (biased) variance
        of each one's input over `x`, computed in training mode (as `fit` normalises)."""
        totals = None
        for start in range(0, len(x), batch_size):
            moments = [[np.asarray(t) for t in m] for m in self._norm_moments(x[start : start + batch_size])]
            totals = moments if totals is None else [[a + b for a, b in zip(t, m)] for t, m in zip(totals, moments)]
        norms = [n for n in self._nodes if n.forward is fw.batch_norm]
        for node, (total, squares, count) in zip(norms, totals or []):
            mean = total / count
            self._variables[node.name]["moving_mean"].assign(mean.astype(np.float32))
            self._variables[node.name]["moving_variance"].assign(
                np.maximum(squares / count - mean**2, 0.0).astype(np.float32)
            )

    def predict(self, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
        """Model outputs for model-ready images `x`, in inference mode."""
        return np.concatenate([np.asarray(self._predict(x[s : s + batch_size])) for s in range(0, len(x), batch_size)])

    def accuracy(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 500) -> float:
        """Top-1 accuracy on model-ready images `x` and integer labels `y`."""
        if len(x) == 0 or len(x) != len(y):
            raise AdapterError(f"accuracy needs as many labels as images, at least one; received {len(x)} and {len(y)}.")
        return float(np.mean(np.argmax(self.predict(x, batch_size=batch_size), axis=-1) == y))

    def weights(self) -> Weights:
        """The current weights, by layer name and weight name."""
        return {layer: {n: v.numpy() for n, v in per_layer.items()} for layer, per_layer in self._variables.items()}


def _adam(variable, gradient, m, v, lr, iteration, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    alpha = lr * tf.sqrt(1 - tf.pow(beta_2, iteration)) / (1 - tf.pow(beta_1, iteration))
    m.assign_add((gradient - m) * (1 - beta_1))
    v.assign_add((tf.square(gradient) - v) * (1 - beta_2))
    variable.assign_sub(m * alpha / (tf.sqrt(v) + epsilon))


def _nesterov_sgd(variable, gradient, m, unused, lr, iteration, momentum=0.9):
    m.assign(m * momentum - gradient * lr)
    variable.assign_add(m * momentum - gradient * lr)


# The updates of adapter.train.OPTIMIZERS, as Keras 3 computes them.
_UPDATES: dict[str, Callable] = {"adam": _adam, "sgd": _nesterov_sgd}
