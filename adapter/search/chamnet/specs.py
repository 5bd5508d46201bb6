"""The LUT specs of a ChamNet candidate, from its record alone (no Keras model built).

The search estimates thousands of candidates and plans the LUT entries of a whole space;
building each candidate's Keras model and converting it would cost half a second apiece.
These are the specs `lut.keras_specs.specs_of_keras` reads from `build(candidate)` — the
converter's fusions included (batch norm and ReLU6 into the convolution, keras.applications'
stride-2 zero padding into SAME where it equals it) — and a test holds the two equal over
sampled candidates at even and odd feature-map sizes.
"""
from __future__ import annotations

from collections.abc import Iterator

from adapter.search.chamnet.build import Block, blocks_of
from adapter.search.chamnet.space import Candidate
from lut.spec import LayerSpec

__all__ = ["block_specs", "candidate_specs"]


def _conv(h: int, cin: int, cout: int, *, k: int = 1, s: int = 1, padding: str = "same", act: str = "none"):
    return LayerSpec("conv2d", h, h, cin, cout, (k, k), (s, s), padding, act)


def _out(h: int, stride: int) -> int:
    return -(-h // stride)


def block_specs(family: str, block: Block, h: int) -> list[LayerSpec]:
    """The specs of one block whose input is h × h × block.cin."""
    out_h = _out(h, block.stride)
    if family == "mobilenet_v1":
        if block.stride == 2 and h % 2:  # keras.applications pads (0, 1): SAME would pad (1, 1)
            specs = [LayerSpec("pad", h, h, block.cin, block.cin, pads=(0, 1, 0, 1)),
                     LayerSpec("depthwise_conv2d", h + 1, h + 1, block.cin, block.cin, (3, 3), (2, 2), "valid", "relu6")]
        else:
            specs = [LayerSpec("depthwise_conv2d", h, h, block.cin, block.cin, (3, 3), (block.stride,) * 2, "same",
                               "relu6")]
        return [*specs, _conv(specs[-1].output_hw[0], block.cin, block.cout, act="relu6")]
    hidden = block.cin * block.expansion if block.id else block.cin
    specs = [_conv(h, block.cin, hidden, act="relu6")] if block.id else []
    specs += [LayerSpec("depthwise_conv2d", h, h, hidden, hidden, (3, 3), (block.stride,) * 2, "same", "relu6"),
              _conv(out_h, hidden, block.cout)]
    if block.stride == 1 and block.cin == block.cout:
        if out_h == 1:  # on one pixel the converter flattens one operand and broadcasts (lut.keras_specs)
            specs.append(LayerSpec("reshape", 1, 1, block.cout, block.cout))
        specs.append(LayerSpec("add", out_h, out_h, block.cout, block.cout))
    return specs


def _head(candidate: Candidate, h: int, channels: int, classes: int) -> Iterator[LayerSpec]:
    if candidate.family == "mobilenet_v2":  # GlobalAveragePooling2D without keepdims: a MEAN even on one pixel
        yield _conv(h, channels, candidate.last, padding="valid", act="relu6")
        yield LayerSpec("mean", h, h, candidate.last, candidate.last)
        yield LayerSpec("fully_connected", 1, 1, candidate.last, classes)
    else:
        if h > 1:  # with keepdims, the converter drops a one-pixel average
            yield LayerSpec("mean", h, h, channels, channels)
        yield _conv(1, channels, classes)
        yield LayerSpec("reshape", 1, 1, classes, classes)
    yield LayerSpec("softmax", 1, 1, classes, classes)


def candidate_specs(candidate: Candidate, classes: int) -> list[LayerSpec]:
    """Every op of `build(candidate, classes)` as the LUT keys it, in order."""
    r = candidate.resolution
    specs = [_conv(r, 3, candidate.stem, k=3, s=2, act="relu6")]
    h = _out(r, 2)
    for block in blocks_of(candidate):
        specs += block_specs(candidate.family, block, h)
        h = specs[-1].output_hw[0]
    channels = candidate.stages[-1].channels
    return specs + list(_head(candidate, h, channels, classes))
