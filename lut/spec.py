"""`LayerSpec`: the canonical key of one op as TFLite runs it inside a converted model.

A spec describes the op *after* conversion: BatchNormalization is folded into the
convolution before it, a ReLU/ReLU6 right after a conv/depthwise/dense/add is fused into
it, and a ZeroPadding2D whose padding equals TensorFlow's SAME padding for the following
valid convolution becomes that convolution's SAME padding.  Two layers with equal specs
cost the same on a device, so the LUT stores one row per spec, keyed by `spec.key`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from lut.errors import LutError

__all__ = ["LayerSpec", "OPS", "CHANNEL_PRESERVING_OPS", "ACTIVATIONS", "DTYPES", "QUANTIZE_OPS", "LutError", "UnsupportedLayerError"]


def _pads(text: str) -> tuple[int, int, int, int]:
    """The `pads=` field of a key: "t,b,l,r", or all zero when empty."""
    if not text:
        return (0, 0, 0, 0)
    top, bottom, left, right = (int(p) for p in text.split(","))
    return (top, bottom, left, right)


class UnsupportedLayerError(LutError):
    """A model contains a layer (or TFLite op, or layer setting) phonefit cannot key into a LUT or
    prune through (`adapter.pruning.graph` raises it too: one class, whichever floor finds the layer)."""


# The ops phonefit measures.  Prunable ops change cost with (cin, cout); the others are
# measured at every shape the pruned model can give them.
OPS = (
    "conv2d",
    "depthwise_conv2d",
    "fully_connected",
    "add",
    "mean",
    "average_pool_2d",
    "max_pool_2d",
    "pad",
    "reshape",
    "softmax",
    "quantize",
    "dequantize",
)
# ops whose output channels are their input channels (cin == cout in their specs)
CHANNEL_PRESERVING_OPS = frozenset(
    {"depthwise_conv2d", "add", "mean", "average_pool_2d", "max_pool_2d", "pad", "softmax", "quantize", "dequantize"}
)
# An int8 model converts its float input with one QUANTIZE and its output back with one
# DEQUANTIZE: keyed int8 (the side that is quantized), measured once per model like any op.
QUANTIZE_OPS = frozenset({"quantize", "dequantize"})
ACTIVATIONS = ("none", "relu", "relu6")
DTYPES = {"float32": "f32", "int8": "i8"}
_ELEMENT_BYTES = {"float32": 4, "int8": 1}
_BIAS_BYTES = 4  # float32 or int32
_PADDINGS = ("same", "valid")

_KEY_RE = re.compile(
    r"^(?P<op>[a-z0-9_]+):(?P<dtype>[a-z0-9]+):(?P<h>\d+)x(?P<w>\d+)x(?P<cin>\d+):(?P<cout>\d+)"
    r":k(?P<kh>\d+)x(?P<kw>\d+):s(?P<sh>\d+)x(?P<sw>\d+):(?P<padding>[a-z]+):(?P<activation>[a-z0-9]+)"
    r"(?::p(?P<pads>\d+,\d+,\d+,\d+))?$"
)


@dataclasses.dataclass(frozen=True, order=True)
class LayerSpec:
    """One op as TFLite runs it.

    `h`, `w`, `cin` describe the op's (first) input, `cout` its output channels (for
    `fully_connected`: input and output features with `h = w = 1`).  `kernel`/`stride`
    are the window of conv and pool ops, `(1, 1)` otherwise.  `pads` (top, bottom, left,
    right) only matters for `pad`.
    """

    op: str
    h: int
    w: int
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: str = "valid"
    activation: str = "none"
    dtype: str = "float32"
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise LutError(f"`op` must be one of {', '.join(OPS)}. Received: op={self.op!r}.")
        for name in ("h", "w", "cin", "cout"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LutError(f"`{name}` must be a positive integer. Received: {name}={value!r}.")
        for name in ("kernel", "stride"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 2 or min(value) < 1:
                raise LutError(f"`{name}` must be two positive integers. Received: {name}={value!r}.")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "pads", tuple(int(v) for v in self.pads))
        if self.padding not in _PADDINGS:
            raise LutError(f"`padding` must be 'same' or 'valid'. Received: padding={self.padding!r}.")
        if self.activation not in ACTIVATIONS:
            raise LutError(
                f"`activation` must be one of {', '.join(ACTIVATIONS)}. Received: activation={self.activation!r}."
            )
        if self.dtype not in DTYPES:
            raise LutError(f"`dtype` must be one of {', '.join(DTYPES)}. Received: dtype={self.dtype!r}.")
        if self.op in QUANTIZE_OPS and self.dtype != "int8":
            raise LutError(f"A {self.op} spec is keyed int8 (its quantized side). Received: dtype={self.dtype!r}.")
        if self.op in CHANNEL_PRESERVING_OPS and self.cin != self.cout:
            raise LutError(f"A {self.op} spec has cin == cout. Received: cin={self.cin}, cout={self.cout}.")

    @property
    def key(self) -> str:
        """Stable text form, the LUT's primary key, e.g. `conv2d:f32:64x64x16:32:k1x1:s1x1:same:relu6`."""
        text = (
            f"{self.op}:{DTYPES[self.dtype]}:{self.h}x{self.w}x{self.cin}:{self.cout}"
            f":k{self.kernel[0]}x{self.kernel[1]}:s{self.stride[0]}x{self.stride[1]}"
            f":{self.padding}:{self.activation}"
        )
        if self.op == "pad":
            text += ":p" + ",".join(map(str, self.pads))
        return text

    @classmethod
    def from_key(cls, key: str) -> LayerSpec:
        match = _KEY_RE.match(key)
        if not match:
            raise LutError(
                "A LUT key looks like 'conv2d:f32:64x64x16:32:k1x1:s1x1:same:relu6'. "
                f"Received: {key!r}."
            )
        g = match.groupdict()
        dtype = {short: long for long, short in DTYPES.items()}.get(g["dtype"])
        if dtype is None:
            raise LutError(f"Unknown dtype {g['dtype']!r} in LUT key {key!r}; known: {', '.join(DTYPES.values())}.")
        return cls(
            op=g["op"],
            h=int(g["h"]),
            w=int(g["w"]),
            cin=int(g["cin"]),
            cout=int(g["cout"]),
            kernel=(int(g["kh"]), int(g["kw"])),
            stride=(int(g["sh"]), int(g["sw"])),
            padding=g["padding"],
            activation=g["activation"],
            dtype=dtype,
            pads=_pads(g["pads"]),
        )

    def replace(self, **changes: Any) -> LayerSpec:
        return dataclasses.replace(self, **changes)

    @property
    def output_hw(self) -> tuple[int, int]:
        """Spatial size of the output (conv/pool arithmetic as TensorFlow does it)."""
        if self.op in ("mean", "fully_connected", "softmax"):
            return (1, 1)
        if self.op in ("reshape", "quantize", "dequantize"):
            return (self.h, self.w)
        if self.op == "pad":
            top, bottom, left, right = self.pads
            return self.h + top + bottom, self.w + left + right
        if self.op == "add":
            return self.h, self.w
        (kh, kw), (sh, sw) = self.kernel, self.stride
        if self.padding == "same":
            return -(-self.h // sh), -(-self.w // sw)
        return (self.h - kh) // sh + 1, (self.w - kw) // sw + 1

    @property
    def weight_bytes(self) -> int:
        """Bytes of the op's constant weights and bias as TFLite stores them (an int8 op's bias is int32)."""
        kh, kw = self.kernel
        weights = {
            "conv2d": kh * kw * self.cin * self.cout,
            "depthwise_conv2d": kh * kw * self.cin,
            "fully_connected": self.cin * self.cout,
        }.get(self.op)
        if weights is None:
            return 0
        return weights * _ELEMENT_BYTES[self.dtype] + self.cout * _BIAS_BYTES

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the op (what FLOP counts count, halved): 0 for ops without weights."""
        (oh, ow), (kh, kw) = self.output_hw, self.kernel
        return {
            "conv2d": oh * ow * kh * kw * self.cin * self.cout,
            "depthwise_conv2d": oh * ow * kh * kw * self.cin,
            "fully_connected": self.cin * self.cout,
        }.get(self.op, 0)

    @property
    def activation_bytes(self) -> int:
        """Bytes of the op's input(s) and output: what it reads and writes besides weights."""
        (oh, ow), inputs = self.output_hw, 2 if self.op == "add" else 1
        return (inputs * self.h * self.w * self.cin + oh * ow * self.cout) * _ELEMENT_BYTES[self.dtype]

    def __str__(self) -> str:
        return self.key
