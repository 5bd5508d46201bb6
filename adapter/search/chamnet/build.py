"""A ChamNet candidate as a Keras model, a base model as a candidate, and weights inherited
from the base ("adapt, don't restart").

`build` lays a candidate out exactly as keras.applications lays out MobileNet (V1) and
MobileNetV2, layer kinds, names and settings alike, with the head `lut.models` gives the
named models; `candidate_of` reads a model so built (or a keras.applications one) back
into a candidate. `inherit` copies the base's weights into a candidate's model: the first
blocks of each stage, and in every channel dimension the base's filters of largest L1
norm (summed over the layers that share the dimension: a stage's residual sum ties its
blocks' outputs); channels beyond the base's keep their fresh initialisation, and a block
beyond the base's in its stage starts as the identity (its residual branch scaled by zero,
so the candidate computes what the base did). Weights do
not depend on the input size, so another resolution inherits them unchanged.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np

from adapter.search.chamnet.space import Candidate, SpaceError, Stage

__all__ = ["Block", "blocks_of", "build", "candidate_of", "inherit"]

_BN = {"mobilenet_v1": dict(epsilon=1e-3, momentum=0.99), "mobilenet_v2": dict(epsilon=1e-3, momentum=0.999)}


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of a laid-out candidate: where it sits and what its layers are called."""

    id: int
    stage: int
    index: int  # within its stage
    cin: int
    cout: int
    stride: int
    expansion: int

    def prefix(self, family: str) -> str:
        if family == "mobilenet_v1":
            return str(self.id + 1)
        return "expanded_conv" if self.id == 0 else f"block_{self.id}"


def blocks_of(candidate: Candidate) -> Iterator[Block]:
    cin, block_id = candidate.stem, 0
    for s, stage in enumerate(candidate.stages):
        for j in range(stage.blocks):
            yield Block(block_id, s, j, cin, stage.channels, stage.stride if j == 0 else 1, stage.expansion)
            cin, block_id = stage.channels, block_id + 1


def build(candidate: Candidate, classes: int):
    """The Keras model of `candidate` with a `classes`-way softmax head (fresh weights)."""
    import keras
    from keras import layers

    from lut.models import MODELS

    family, bn = candidate.family, _BN[candidate.family]
    inputs = keras.Input((candidate.resolution, candidate.resolution, 3))
    stem = layers.Conv2D(candidate.stem, 3, strides=2, padding="same", use_bias=False,
                         name="conv1" if family == "mobilenet_v1" else "Conv1")
    x = _unit(inputs, stem, *(("conv1_bn", "conv1_relu") if family == "mobilenet_v1" else ("bn_Conv1", "Conv1_relu")),
              bn)
    for block in blocks_of(candidate):
        x = (_v1_block if family == "mobilenet_v1" else _v2_block)(x, block, bn)
    if family == "mobilenet_v2":
        x = _unit(x, layers.Conv2D(candidate.last, 1, use_bias=False, name="Conv_1"), "Conv_1_bn", "out_relu", bn)
    outputs = MODELS[family].head(x, classes)
    return keras.Model(inputs, outputs, name=f"chamnet_{family}_{candidate.resolution}")


def _unit(x, layer, bn_name: str, relu_name: str | None, bn: dict):
    """`layer`, its batch norm and (unless `relu_name` is None) its ReLU6, named as keras.applications names them."""
    from keras import layers

    x = layers.BatchNormalization(name=bn_name, **bn)(layer(x))
    return x if relu_name is None else layers.ReLU(6.0, name=relu_name)(x)


def _depthwise(stride: int, name: str):
    from keras import layers

    return layers.DepthwiseConv2D(3, strides=stride, padding="same" if stride == 1 else "valid", use_bias=False,
                                  name=name)


def _v1_block(x, block: Block, bn: dict):
    from keras import layers

    n = block.prefix("mobilenet_v1")
    if block.stride == 2:
        x = layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"conv_pad_{n}")(x)
    x = _unit(x, _depthwise(block.stride, f"conv_dw_{n}"), f"conv_dw_{n}_bn", f"conv_dw_{n}_relu", bn)
    pointwise = layers.Conv2D(block.cout, 1, padding="same", use_bias=False, name=f"conv_pw_{n}")
    return _unit(x, pointwise, f"conv_pw_{n}_bn", f"conv_pw_{n}_relu", bn)


def _v2_block(x, block: Block, bn: dict):
    from keras import layers

    p, inputs = block.prefix("mobilenet_v2"), x
    if block.id:  # keras.applications: every block but the first expands (by 1 too)
        expand = layers.Conv2D(block.cin * block.expansion, 1, padding="same", use_bias=False, name=f"{p}_expand")
        x = _unit(x, expand, f"{p}_expand_BN", f"{p}_expand_relu", bn)
    if block.stride == 2:
        size = int(x.shape[1])
        x = layers.ZeroPadding2D(((size % 2, 1), (size % 2, 1)), name=f"{p}_pad")(x)  # keras.applications' correct_pad
    x = _unit(x, _depthwise(block.stride, f"{p}_depthwise"), f"{p}_depthwise_BN", f"{p}_depthwise_relu", bn)
    project = layers.Conv2D(block.cout, 1, padding="same", use_bias=False, name=f"{p}_project")
    x = _unit(x, project, f"{p}_project_BN", None, bn)
    if block.stride == 1 and block.cin == block.cout:
        x = layers.Add(name=f"{p}_add")([inputs, x])
    return x


# ---------------------------------------------------------------- reading a model back
def candidate_of(model) -> Candidate:
    """The candidate `model` is: a MobileNet (V1) or MobileNetV2 laid out as keras.applications
    lays them out. Stages are runs of blocks of one width; a stride-2 block starts a new one."""
    names = {layer.name for layer in model.layers}
    if "Conv1" in names:
        family, stem_name = "mobilenet_v2", "Conv1"
        ids = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"block_(\d+)_project", n)))
        prefixes = ["expanded_conv", *(f"block_{i}" for i in ids)]
        project, depthwise = "{}_project", "{}_depthwise"
    elif "conv1" in names:
        family, stem_name = "mobilenet_v1", "conv1"
        ids = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"conv_pw_(\d+)", n)))
        prefixes = [str(i) for i in ids]
        project, depthwise = "conv_pw_{}", "conv_dw_{}"
    else:
        raise SpaceError(f"{model.name} is not a MobileNet laid out as keras.applications lays it out (no Conv1 or "
                         "conv1 layer); ChamNet's space needs mobilenet_v1 or mobilenet_v2.")
    stages: list[list] = []
    cin = model.get_layer(stem_name).filters
    for p in prefixes:
        cout = model.get_layer(project.format(p)).filters
        stride = model.get_layer(depthwise.format(p)).strides[0]
        expansion = 1
        if family == "mobilenet_v2" and p != "expanded_conv":
            expansion = round(model.get_layer(f"{p}_expand").filters / cin)
        if not stages or stride == 2 or cout != stages[-1][0]:
            stages.append([cout, 0, stride, expansion])
        stages[-1][1] += 1
        cin = cout
    last = model.get_layer("Conv_1").filters if family == "mobilenet_v2" else 0
    resolution = int(model.inputs[0].shape[1])
    return Candidate(family, resolution, model.get_layer(stem_name).filters,
                     tuple(Stage(c, b, s, e) for c, b, s, e in stages), last)


# ---------------------------------------------------------------- inheriting weights
def _top(norms: np.ndarray, size: int) -> np.ndarray:
    """Indices of the `size` largest `norms` in their original order; -1 for channels past them."""
    keep = np.sort(np.argsort(-norms, kind="stable")[:size])
    return np.concatenate([keep, -np.ones(size - len(keep), dtype=int)])


def _l1(kernel: np.ndarray) -> np.ndarray:
    """L1 norm per output channel of a conv kernel (k, k, in, out) or depthwise (k, k, c, 1)."""
    return np.abs(kernel).sum(axis=(0, 1, 2)) if kernel.shape[-1] != 1 else np.abs(kernel).sum(axis=(0, 1, 3))


def _copy(target: np.ndarray, source: np.ndarray, picks: list[np.ndarray | None]) -> np.ndarray:
    """`target` with the entries whose picked source index exists along every axis taken from `source`
    (`picks[a]`: per target index along axis a, the source index, -1 for none; None: the same index)."""
    out = target.copy()
    grids, full = [], np.ones(target.shape, dtype=bool)
    for axis, pick in enumerate(picks):
        if pick is None:
            pick = np.arange(target.shape[axis])
        shape = [1] * target.ndim
        shape[axis] = -1
        full &= (pick >= 0).reshape(shape)
        grids.append(np.where(pick >= 0, pick, 0))
    out[full] = source[np.ix_(*grids)][full]
    return out


class _Layers:
    """Both models' layers by role: ("stem"|"last"|block id, part)."""

    def __init__(self, candidate: Candidate, model):
        self.candidate, self.model, self.family = candidate, model, candidate.family
        self.blocks = list(blocks_of(candidate))

    def conv(self, block: Block | None, part: str):
        v1 = self.family == "mobilenet_v1"
        if block is None:
            name = {"stem": "conv1" if v1 else "Conv1", "last": "Conv_1"}[part]
            bn = {"stem": "conv1_bn" if v1 else "bn_Conv1", "last": "Conv_1_bn"}[part]
        else:
            p = block.prefix(self.family)
            name = {"depthwise": f"conv_dw_{p}", "project": f"conv_pw_{p}"}[part] if v1 else f"{p}_{part}"
            bn = f"{name}_bn" if v1 else f"{name}_BN"
        return self.model.get_layer(name), self.model.get_layer(bn)

    def first_blocks(self) -> dict[tuple[int, int], Block]:
        return {(b.stage, b.index): b for b in self.blocks}


def inherit(model, candidate: Candidate, base_model, base: Candidate | None = None) -> None:
    """Set `model`'s (built by `build(candidate)`) weights from `base_model`'s (see the module doc)."""
    base = base or candidate_of(base_model)
    if (base.family, len(base.stages)) != (candidate.family, len(candidate.stages)):
        raise SpaceError(f"{candidate.text()} is not in the space of {base.text()}: another family or stage count.")
    mine, theirs = _Layers(candidate, model), _Layers(base, base_model)
    base_blocks = theirs.first_blocks()


    # every channel dimension's pick: the stem's, each stage's (all its blocks' outputs), each block's expansion
    stem_kernel = theirs.conv(None, "stem")[0].get_weights()[0]
    stage_norms = [np.sum([_l1(theirs.conv(b, "project")[0].get_weights()[0]) for b in theirs.blocks if b.stage == s],
                          axis=0) for s in range(len(base.stages))]
    stem_pick = _top(_l1(stem_kernel), candidate.stem)
    stage_picks = [_top(norms, stage.channels) for norms, stage in zip(stage_norms, candidate.stages)]

    def space_of_input(block: Block) -> np.ndarray:
        if block.index:
            return stage_picks[block.stage]
        return stem_pick if block.stage == 0 else stage_picks[block.stage - 1]

    def put(target_layers, source_layers, in_pick, out_pick, depthwise=False):
        (conv, bn), (base_conv, base_bn) = target_layers, source_layers
        [kernel], [base_kernel] = conv.get_weights(), base_conv.get_weights()
        axes = [None, None, out_pick, None] if depthwise else [None, None, in_pick, out_pick]
        conv.set_weights([_copy(kernel, base_kernel, axes)])
        bn.set_weights([_copy(w, bw, [out_pick]) for w, bw in zip(bn.get_weights(), base_bn.get_weights())])

    put(mine.conv(None, "stem"), theirs.conv(None, "stem"), None, stem_pick)
    for block in mine.blocks:
        origin = base_blocks.get((block.stage, block.index))
        if origin is None:
            # a block past the base's in its stage starts as the identity: its residual branch's
            # last batch norm scales by zero, so the candidate computes what the base did
            bn = mine.conv(block, "project")[1]
            gamma, *rest = bn.get_weights()
            bn.set_weights([np.zeros_like(gamma), *rest])
            continue
        in_pick = space_of_input(block)
        if mine.family == "mobilenet_v1":
            put(mine.conv(block, "depthwise"), theirs.conv(origin, "depthwise"), None, in_pick, depthwise=True)
            put(mine.conv(block, "project"), theirs.conv(origin, "project"), in_pick, stage_picks[block.stage])
            continue
        if block.id:
            expand, base_expand = mine.conv(block, "expand"), theirs.conv(origin, "expand")
            hidden = _top(_l1(base_expand[0].get_weights()[0]), expand[0].filters)
            put(expand, base_expand, in_pick, hidden)
        else:
            hidden = in_pick
        put(mine.conv(block, "depthwise"), theirs.conv(origin, "depthwise"), None, hidden, depthwise=True)
        put(mine.conv(block, "project"), theirs.conv(origin, "project"), hidden, stage_picks[block.stage])
    features = stage_picks[-1]
    if mine.family == "mobilenet_v2":
        last = _top(_l1(theirs.conv(None, "last")[0].get_weights()[0]), candidate.last)
        put(mine.conv(None, "last"), theirs.conv(None, "last"), features, last)
        features = last
    _inherit_head(model, base_model, features)


def _inherit_head(model, base_model, features: np.ndarray) -> None:
    """The classifier's weights: the inputs the candidate keeps, every class."""
    for layer in model.layers:
        if layer.name in ("predictions", "conv_preds") and layer.get_weights():
            kernel, bias = layer.get_weights()
            base_kernel, base_bias = base_model.get_layer(layer.name).get_weights()
            if base_kernel.shape[-1] != kernel.shape[-1]:
                raise SpaceError(f"The base model has {base_kernel.shape[-1]} classes, the candidate "
                                 f"{kernel.shape[-1]}; build candidates with the base's classes.")
            axes = [features, None] if kernel.ndim == 2 else [None, None, features, None]
            layer.set_weights([_copy(kernel, base_kernel, axes), base_bias])
