"""IDX files (Fashion-MNIST's format): a pure parser from bytes to an array, and a file reader.

The magic number is 0x0000TTDD (element type TT, DD dimensions), then the dimension sizes
and the values, all big-endian (yann.lecun.com/exdb/mnist); the files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np

from adapter.errors import AdapterError

__all__ = ["parse_idx", "read_idx"]

# IDX type byte -> element type; multi-byte values are big-endian (yann.lecun.com/exdb/mnist).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(raw: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """The array stored in IDX bytes: magic 0x0000TTDD (type TT, DD dimensions), big-endian.

    Raises `AdapterError` for anything that is not a complete IDX array.
    """
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise AdapterError(
            f"{source} is not an IDX file: expected a magic number 0x0000TTDD with type TT in "
            f"{{{', '.join(f'0x{t:02X}' for t in _IDX_DTYPES)}}} and DD ≥ 1 dimensions; "
            f"received 0x{raw[:4].hex().upper() or 'nothing'}."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AdapterError(
            f"{source} is truncated: expected {ndim} dimension sizes in its header; "
            f"received {len(raw)} bytes in all."
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise AdapterError(
            f"{source} has the wrong size: expected {expected} data bytes for dimensions "
            f"{'×'.join(map(str, dims))}; received {len(raw) - header}."
        )
    array = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header)
    return array.reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array in an IDX file, gzip-compressed or not (told apart by content, not name)."""
    raw = Path(path).read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise AdapterError(f"{path} is a damaged gzip file ({e}); reinstall or re-download it.") from e
    return parse_idx(raw, source=str(path))
