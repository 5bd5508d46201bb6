"""Single-op `.tflite` models, now `profiler.single_op` (this name stays for its importers)."""
from profiler.single_op import SingleOpFactory, keras_layers_for, naive_single_op_model

__all__ = ["SingleOpFactory", "keras_layers_for", "naive_single_op_model"]
