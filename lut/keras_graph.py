"""The one place that reads Keras' private graph attributes (`_keras_history`, `_inbound_nodes`,
`operations`): which layer made a tensor, which layers feed a layer, the layers in order.

Keras 3 has no public API for a functional model's graph; every walker in phonefit
(`lut.keras_specs`, `profiler.plan`, `adapter.pruning.graph`, `adapter.training.flex`, `adapter.pruning.surgery`) goes
through these few functions, so a Keras release that renames them breaks one file. Also
`as_functional`: the graph these functions read, for a Sequential as for a functional model.
"""

from __future__ import annotations

from typing import Any

from lut.errors import LutError

__all__ = ["as_functional", "inbound_layers", "layers_in_order", "node_of", "producer_of"]


def producer_of(tensor: Any) -> Any:
    """The layer (Keras operation) whose call produced the symbolic `tensor`."""
    return tensor._keras_history.operation


def node_of(tensor: Any) -> Any:
    """The graph node (one call of a layer: `operation`, `input_tensors`, `output_tensors`)
    that produced `tensor`."""
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index]


def inbound_layers(layer: Any) -> list[Any]:
    """The layers whose outputs the first call of `layer` takes, in argument order."""
    node = layer._inbound_nodes[0]
    return [producer_of(t) for t in node.input_tensors]


def layers_in_order(model: Any) -> list[Any]:
    """Every layer of a functional `model` (its input layers included), in execution order."""
    return list(model.operations)


def as_functional(model: Any, source: str = "the model") -> Any:
    """`model` as a functional Keras model, the graph phonefit reads; a Sequential is rebuilt as one.

    Refuses, with a one-line `LutError`, what has no layer graph (a subclassed model, or
    anything that is not a Keras model), no fixed image input, or several inputs.
    """
    import keras  # loads TensorFlow: only callers that already hold a Keras model get here

    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "inputs", None):
            raise LutError(
                f"{source} is a keras.Sequential without an input shape; expected a model that knows its input: "
                "start it with keras.Input((H, W, C)) and save it again."
            )
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    elif not isinstance(model, keras.Model) or not hasattr(model, "operations") or not getattr(model, "inputs", None):
        kind = f"a subclassed {type(model).__name__}" if isinstance(model, keras.Model) else f"a {type(model).__name__}"
        raise LutError(
            f"{source} is {kind}; expected a functional or Sequential Keras model, "
            "whose layer graph phonefit can read. Build it with keras.Model(inputs, outputs)."
        )
    if len(model.inputs) != 1:
        raise LutError(f"{source} has {len(model.inputs)} inputs; expected one image input.")
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise LutError(
            f"{source} takes inputs of shape {tuple(model.inputs[0].shape)}; expected images of a fixed size "
            "(batch, H, W, C). Give keras.Input a fixed shape, e.g. keras.Input((224, 224, 3))."
        )
    return model
