"""Read the ops of a `.tflite` flatbuffer: exact details (`op_details`) and LUT keys (`specs_of_tflite`).

The flatbuffer is read with the TFLite schema's generated object API.  LiteRT ships that
module as `ai_edge_litert.schema_py_generated` (it needs only `flatbuffers`), so reading
a model does not import TensorFlow; TensorFlow's copy is the fallback.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from lut.spec import LayerSpec, LutError, UnsupportedLayerError

__all__ = ["op_details", "read_model", "specs_of_tflite", "tflite_schema"]

_FILE_IDENTIFIER = b"TFL3"
_ACTIVATIONS = {0: "none", 1: "relu", 3: "relu6"}  # ActivationFunctionType -> LayerSpec.activation
_PADDINGS = {0: "same", 1: "valid"}  # schema Padding -> LayerSpec.padding
_DTYPES = {"FLOAT32": "float32", "INT8": "int8"}  # TensorType name -> LayerSpec.dtype


@functools.cache
def tflite_schema() -> Any:
    """The TFLite schema's generated Python module (LiteRT's copy, else TensorFlow's)."""
    try:
        # optional: LiteRT's copy of the schema, else TensorFlow's
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        try:
            from tensorflow.lite.python import schema_py_generated as schema
        except ImportError as e:
            raise LutError(
                "Reading .tflite files needs the TFLite schema module: pip install ai-edge-litert (or tensorflow)."
            ) from e
    return schema


@functools.cache
def _enum_names(enum_class: type) -> dict[int, str]:
    return {value: name for name, value in vars(enum_class).items() if not name.startswith("_")}


def read_model(model: bytes) -> Any:
    """Unpack `model` (the bytes of a `.tflite` file) into the schema's mutable `ModelT`."""
    if not isinstance(model, (bytes, bytearray, memoryview)):
        raise LutError(f"`model` must be the bytes of a .tflite file. Received: {type(model).__name__}.")
    if bytes(model[4:8]) != _FILE_IDENTIFIER:
        raise LutError(
            f"Not a TFLite flatbuffer: expected the file identifier {_FILE_IDENTIFIER!r} at byte 4. "
            f"Received: {bytes(model[4:8])!r} ({len(model)} bytes). Pass the bytes of a .tflite file."
        )
    try:
        return tflite_schema().ModelT.InitFromPackedBuf(bytearray(model), 0)
    except Exception as e:  # the generated reader raises anything from struct.error to IndexError
        raise LutError(f"Could not read the TFLite flatbuffer ({len(model)} bytes): {e}. Is the file truncated?") from e


@dataclasses.dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]
    dtype: str  # TensorType name, e.g. "FLOAT32"
    data: np.ndarray | None  # the constant's values, None for activations


@dataclasses.dataclass(frozen=True)
class _Op:
    index: int
    opcode: str  # BuiltinOperator name, e.g. "CONV_2D"
    version: int
    options: dict[str, Any]
    inputs: tuple[_Tensor | None, ...]  # None where an optional input is absent
    outputs: tuple[_Tensor, ...]

    def input(self, index: int) -> _Tensor:
        """Input `index`, which the op's parser needs present."""
        tensor = self.inputs[index] if index < len(self.inputs) else None
        if tensor is None:
            raise _Unsupported(f"input {index} is absent")
        return tensor


_NUMPY_DTYPES = {"FLOAT32": "<f4", "INT32": "<i4", "INT64": "<i8", "INT8": "i1", "UINT8": "u1", "INT16": "<i2"}


def _tensor(model: Any, subgraph: Any, index: int) -> _Tensor | None:
    if index < 0:
        return None
    tensor = subgraph.tensors[index]
    dtype = _enum_names(tflite_schema().TensorType)[tensor.type]
    shape = tuple(int(d) for d in (tensor.shape if tensor.shape is not None else ()))
    raw = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
    data = None
    if raw is not None and len(raw) and dtype in _NUMPY_DTYPES:
        data = np.frombuffer(np.asarray(raw, np.uint8).tobytes(), _NUMPY_DTYPES[dtype]).reshape(shape)
    return _Tensor(shape, dtype, data)


def _options_dict(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    return {name: _plain(value) for name, value in vars(options).items()}


def _plain(value: Any) -> Any:
    """An option value as plain data: vectors as lists, nested option tables as dicts."""
    if isinstance(value, (list, np.ndarray)):
        return np.asarray(value).tolist()
    if hasattr(value, "__dict__"):
        return _options_dict(value)
    return value


def _ops(model: bytes) -> list[_Op]:
    flat = read_model(model)
    if not flat.subgraphs:
        raise LutError("The TFLite model has no subgraph; it is not a model the converter writes.")
    builtin_names = _enum_names(tflite_schema().BuiltinOperator)
    subgraph = flat.subgraphs[0]
    ops = []
    for index, op in enumerate(subgraph.operators or ()):
        code = flat.operatorCodes[op.opcodeIndex]
        # Codes above 127 live only in `builtinCode`; older files fill only the deprecated field.
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        opcode = "CUSTOM:" + code.customCode.decode() if code.customCode else builtin_names.get(builtin, str(builtin))
        ops.append(
            _Op(
                index=index,
                opcode=opcode,
                version=int(code.version),
                options=_options_dict(op.builtinOptions),
                inputs=tuple(_tensor(flat, subgraph, i) for i in (op.inputs if op.inputs is not None else ())),
                outputs=tuple(t for i in (op.outputs if op.outputs is not None else ()) if (t := _tensor(flat, subgraph, i))),
            )
        )
    return ops


def _tensor_details(tensor: _Tensor | None) -> dict[str, Any] | None:
    if tensor is None:
        return None
    return {"shape": tensor.shape, "dtype": tensor.dtype.lower(), "const": tensor.data is not None}


def op_details(model: bytes) -> list[dict[str, Any]]:
    """Every op of `model`'s main subgraph in execution order, as plain data to compare exactly.

    Each op is `{"opcode", "version", "options", "inputs", "outputs"}`: the builtin
    operator's name (e.g. `"CONV_2D"`), its version, its builtin options as a dict of the
    schema's field names, and one `{"shape", "dtype", "const"}` per input and output
    tensor (`None` for an absent optional input).  Tensor names and buffer contents are
    left out: they differ between two models that run the same op.
    """
    return [
        {
            "opcode": op.opcode,
            "version": op.version,
            "options": op.options,
            "inputs": [_tensor_details(t) for t in op.inputs],
            "outputs": [_tensor_details(t) for t in op.outputs],
        }
        for op in _ops(model)
    ]


# ---- ops -> LayerSpecs ------------------------------------------------------------------


class _Unsupported(Exception):
    """Why one op cannot be keyed; turned into an `UnsupportedLayerError` naming the op."""


def _nhwc(tensor: _Tensor) -> tuple[int, int, int]:
    """(h, w, c) of an activation tensor with batch 1: NHWC, or (1, 1, c) for a 2-D one."""
    shape = tensor.shape
    if len(shape) not in (2, 4) or shape[0] != 1:
        raise _Unsupported(
            f"expected a [1, H, W, C] or [1, C] tensor, received shape {list(shape)} "
            "(convert with the batch fixed to 1, as profiler.convert.keras_to_tflite does)"
        )
    return (shape[1], shape[2], shape[3]) if len(shape) == 4 else (1, 1, shape[1])


def _dtype(op: _Op) -> str:
    dtype = op.input(0).dtype
    if dtype not in _DTYPES:
        raise _Unsupported(f"expected a {' or '.join(_DTYPES)} input, received {dtype}")
    return _DTYPES[dtype]


def _activation(op: _Op) -> str:
    code = op.options.get("fusedActivationFunction", 0)
    if code not in _ACTIVATIONS:
        name = _enum_names(tflite_schema().ActivationFunctionType).get(code, code)
        raise _Unsupported(f"fused activation {name} (phonefit keys NONE, RELU and RELU6)")
    return _ACTIVATIONS[code]


def _window(op: _Op, kernel: tuple[int, int]) -> dict[str, Any]:
    options = op.options
    if options.get("dilationHFactor", 1) != 1 or options.get("dilationWFactor", 1) != 1:
        raise _Unsupported(f"dilation {options['dilationHFactor']}x{options['dilationWFactor']} (only 1x1 is keyed)")
    return {
        "kernel": kernel,
        "stride": (options["strideH"], options["strideW"]),
        "padding": _PADDINGS[options["padding"]],
        "activation": _activation(op),
    }


def _conv2d(op: _Op) -> LayerSpec:
    h, w, cin = _nhwc(op.input(0))
    cout, kh, kw, filter_cin = op.input(1).shape
    if filter_cin != cin:
        raise _Unsupported(f"grouped convolution (filter depth {filter_cin}, input channels {cin})")
    return LayerSpec("conv2d", h, w, cin, cout, dtype=_dtype(op), **_window(op, (kh, kw)))


def _depthwise_conv2d(op: _Op) -> LayerSpec:
    h, w, cin = _nhwc(op.input(0))
    _, kh, kw, cout = op.input(1).shape
    if cout != cin:
        raise _Unsupported(f"depth multiplier {cout // cin} (only 1 is keyed)")
    return LayerSpec("depthwise_conv2d", h, w, cin, cout, dtype=_dtype(op), **_window(op, (kh, kw)))


def _fully_connected(op: _Op) -> LayerSpec:
    units, features = op.input(1).shape
    if int(np.prod(op.input(0).shape)) != features:
        raise _Unsupported(f"input shape {list(op.input(0).shape)} for {features} input features (batch must be 1)")
    return LayerSpec("fully_connected", 1, 1, features, units, activation=_activation(op), dtype=_dtype(op))


def _add(op: _Op) -> LayerSpec:
    shapes = [tuple(op.input(i).shape) for i in range(2)]
    # On a 1x1 map the converter flattens one operand of a residual add: (1,1,1,c) + (c,).
    one_pixel = shapes[0][:3] == (1, 1, 1) and shapes[1] == shapes[0][3:]
    if (shapes[0] != shapes[1] and not one_pixel) or any(op.input(i).data is not None for i in range(2)):
        raise _Unsupported("an ADD of a constant or with broadcasting (only two equal-shaped activations are keyed)")
    h, w, c = _nhwc(op.input(0))
    return LayerSpec("add", h, w, c, c, activation=_activation(op), dtype=_dtype(op))


def _mean(op: _Op) -> LayerSpec:
    axes = op.input(1).data
    if len(op.input(0).shape) != 4 or axes is None or sorted(axes.ravel().tolist()) != [1, 2]:
        raise _Unsupported("a MEAN that is not a global average pool (axes [1, 2] of a 4-D tensor)")
    h, w, c = _nhwc(op.input(0))
    return LayerSpec("mean", h, w, c, c, dtype=_dtype(op))


def _pool(name: str) -> Callable[[_Op], LayerSpec]:
    def parse(op: _Op) -> LayerSpec:
        h, w, c = _nhwc(op.input(0))
        window = _window(op, (op.options["filterHeight"], op.options["filterWidth"]))
        return LayerSpec(name, h, w, c, c, dtype=_dtype(op), **window)

    return parse


def _pad(op: _Op) -> LayerSpec:
    paddings = op.input(1).data
    if len(op.input(0).shape) != 4 or paddings is None or paddings.shape != (4, 2) or paddings[[0, 3]].any():
        raise _Unsupported("a PAD of other than the spatial dimensions of a 4-D tensor")
    h, w, c = _nhwc(op.input(0))
    (top, bottom), (left, right) = paddings[1].tolist(), paddings[2].tolist()
    return LayerSpec("pad", h, w, c, c, dtype=_dtype(op), pads=(top, bottom, left, right))


def _reshape(op: _Op) -> LayerSpec:
    h, w, c = _nhwc(op.input(0))
    return LayerSpec("reshape", h, w, c, op.outputs[0].shape[-1], dtype=_dtype(op))


def _softmax(op: _Op) -> LayerSpec:
    h, w, c = _nhwc(op.input(0))
    return LayerSpec("softmax", h, w, c, c, dtype=_dtype(op))


def _conversion(name: str, source: str, target: str, why: str) -> Callable[[_Op], LayerSpec]:
    """The parser of an int8 model's QUANTIZE (float input to int8) or DEQUANTIZE (int8 output to float)."""

    def parse(op: _Op) -> LayerSpec:
        if (op.input(0).dtype, op.outputs[0].dtype) != (source, target):
            raise _Unsupported(f"a {name.upper()} from {op.input(0).dtype} to {op.outputs[0].dtype} (only {source} to "
                               f"{target}, {why}, is keyed)")
        h, w, c = _nhwc(op.input(0))
        return LayerSpec(name, h, w, c, c, dtype="int8")

    return parse


# BuiltinOperator name -> parser of one op into its LayerSpec.
_PARSERS: dict[str, Callable[[_Op], LayerSpec]] = {
    "CONV_2D": _conv2d,
    "DEPTHWISE_CONV_2D": _depthwise_conv2d,
    "FULLY_CONNECTED": _fully_connected,
    "ADD": _add,
    "MEAN": _mean,
    "AVERAGE_POOL_2D": _pool("average_pool_2d"),
    "MAX_POOL_2D": _pool("max_pool_2d"),
    "PAD": _pad,
    "RESHAPE": _reshape,
    "SOFTMAX": _softmax,
    "QUANTIZE": _conversion("quantize", "FLOAT32", "INT8", "an int8 model's input; not a requantization"),
    "DEQUANTIZE": _conversion("dequantize", "INT8", "FLOAT32", "an int8 model's output; not float16 weights"),
}


def specs_of_tflite(model: bytes) -> list[LayerSpec]:
    """The `LayerSpec` of every op of `model` (the bytes of a `.tflite` file), in execution order.

    `h`, `w`, `cin` come from the op's first input (`h = w = 1` for a 2-D one), `cout`
    from its output channels, window, padding and fused activation from its options.
    An op phonefit cannot key raises `UnsupportedLayerError` naming the op and its index.
    """
    specs = []
    for op in _ops(model):
        parser = _PARSERS.get(op.opcode)
        try:
            if parser is None:
                raise _Unsupported(f"phonefit keys only {', '.join(_PARSERS)}")
            specs.append(parser(op))
        except (_Unsupported, LutError) as e:
            raise UnsupportedLayerError(
                f"Op #{op.index} ({op.opcode}) cannot be keyed into a LUT: {e}. "
                "Replace the layer that produces it, or convert the model as profiler.convert.keras_to_tflite does."
            ) from e
    return specs
