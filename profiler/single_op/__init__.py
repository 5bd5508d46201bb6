"""Single-op `.tflite` models: for each `LayerSpec`, a model whose one op is what the whole
converted model runs for that layer.

Converting a Keras model is slow (docs/profiler-figures.md), and a LUT needs thousands of these models.
`SingleOpFactory` therefore converts one small *template* per op configuration (the spec
with its channels shrunk to at most 2 and its spatial size to at most 4 — sizes up to 4
are kept exactly, because the converter treats 1×1 maps specially: it drops a MEAN over
one and turns an ADD of two into RESHAPE + broadcast ADD), checks that the converter made
exactly the expected op of it, keeps it unpacked in the TFLite schema's object API, and
for each spec rewrites the op's tensor shapes and constant buffers (weights, bias,
paddings, target shape) and packs it.  `naive_single_op_model` is the
one-conversion-per-spec reference; both give the same op (opcode, version, builtin
options, tensor shapes and dtypes) and, for one seed, the same weights; a factory's
models are byte-for-byte reproducible.

Weights are random normal × 0.1 with magnitudes of at least 1e-4 (no zeros, which the
converter would fold away in a bias, and no denormals, which some CPUs run slowly),
drawn from a generator seeded by `(seed, spec.key)` so a model depends only on them.
"""
from profiler.single_op.factory import SingleOpFactory, keras_layers_for, naive_single_op_model

__all__ = ["SingleOpFactory", "keras_layers_for", "naive_single_op_model"]
