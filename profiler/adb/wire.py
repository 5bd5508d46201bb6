"""adb-shell below its public API: the one module that touches its private attributes.

Two things batches need that adb-shell's public API does not give:

* a TCP transport that fails fast on a closed socket, sends without Nagle's delay and
  writes whole chunks (`tcp_transport`), built on `TcpTransport`'s private socket;
* a pipelined sync push (`push_files`) built on `AdbDevice`'s message layer (`_open`,
  `_read_until`, `_io_manager`, `_clse`, `_maxdata`).

Both are written against adb-shell 0.4 (`SUPPORTED_ADB_SHELL`); `check_adb_shell` stops with
a `ProfilerError` naming the supported versions before another version is used.
"""
from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata

import numpy as np
from adb_shell import constants
from adb_shell.adb_device import AdbDevice as AdbShellDevice
from adb_shell.adb_message import AdbMessage
from adb_shell.exceptions import TcpTimeoutException
from adb_shell.transport.tcp_transport import TcpTransport

from profiler.errors import ProfilerError

__all__ = ["SUPPORTED_ADB_SHELL", "check_adb_shell", "push_files", "tcp_transport"]

SUPPORTED_ADB_SHELL = ((0, 4, 4), (0, 5))  # from this version up to, not including, that one
_SYNC_DATA_MAX = 64 * 1024  # the largest DATA chunk of adb's sync protocol
_PRIVATE_METHODS = ("_open", "_read_until", "_clse")  # and, per connection, `_io_manager` and `_maxdata`


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_adb_shell() -> None:
    """Raise `ProfilerError` unless the installed adb-shell is one this module is written for."""
    low, high = SUPPORTED_ADB_SHELL
    supported = f"adb-shell >= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))}"
    try:
        installed = metadata.version("adb-shell")
    except metadata.PackageNotFoundError:
        installed = "unknown"
    missing = [name for name in _PRIVATE_METHODS if not hasattr(AdbShellDevice, name)]
    if missing or not low <= _version(installed) < high:
        raise ProfilerError(
            f"phonefit talks to phones through adb-shell's internals and supports {supported}. "
            f"Received: adb-shell {installed}{' without ' + ', '.join(missing) if missing else ''}. "
            f"Install a supported one: pip install '{supported.replace(' ', '')}'."
        )


class _BatchTcpTransport(TcpTransport):  # type: ignore[misc]  # adb-shell ships no type information
    """adb-shell's TCP transport with three fixes that batches need.

    * A closed socket raises at once: adb-shell's transport returns b"" and its readers
      retry until their read timeout, which for a batch is minutes.
    * TCP_NODELAY: adb-shell writes a message's header and payload separately, and Nagle's
      algorithm then holds the payload until the header is acknowledged, which the peer
      delays (delayed acknowledgements).
    * Writes send everything: on a non-blocking socket one `send` may take part of a chunk.
    """

    def __init__(self, host: str, port: int):
        super().__init__(host, port)
        self._where = f"{host}:{port}"

    def connect(self, transport_timeout_s: float | None) -> None:
        super().connect(transport_timeout_s)
        self._connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def bulk_read(self, numbytes: int, transport_timeout_s: float | None) -> bytes:
        data: bytes = super().bulk_read(numbytes, transport_timeout_s)
        if not data:
            raise ConnectionResetError(f"the phone at {self._where} closed the connection")
        return data

    def bulk_write(self, data: bytes, transport_timeout_s: float | None) -> int:
        view = memoryview(data)
        while view:
            _, writable, _ = select.select([], [self._connection], [], transport_timeout_s)
            if not writable:
                raise TcpTimeoutException(f"Sending to {self._where} timed out after {transport_timeout_s} s")
            view = view[self._connection.send(view):]
        return len(data)


def tcp_transport(host: str, port: int) -> TcpTransport:
    """The TCP transport batches use (see `_BatchTcpTransport`)."""
    return _BatchTcpTransport(host, port)


class _Message(AdbMessage):  # type: ignore[misc]  # adb-shell ships no type information
    """adb-shell's message, its checksum (the sum of the payload's bytes, which ADB before
    version 0x01000001 sends and adb-shell speaks) summed by numpy rather than Python's
    `sum`, which is slow for a batch's megabytes."""

    @property
    def checksum(self) -> int:
        return byte_sum(self.data)


def byte_sum(data: bytes) -> int:
    """The ADB checksum of `data`: the sum of its bytes, modulo 2**32."""
    return int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


class _SyncReplies:
    """The phone's answers in a sync session: one OKAY per file pushed, or a FAIL with a reason."""

    def __init__(self, paths: Sequence[str]):
        self._paths, self._pending, self.confirmed = paths, bytearray(), 0

    def take(self, cmd: bytes, data: bytes) -> None:
        """Count the sync answers in a WRTE (read_until has acknowledged it)."""
        if cmd == constants.CLSE:
            raise ConnectionResetError("the phone closed the sync session during a push")
        replies = self._pending
        replies.extend(data)
        while len(replies) >= 8:
            kind, size = struct.unpack("<4sI", replies[:8])
            if kind == b"OKAY":
                del replies[:8]
                self.confirmed += 1
            elif kind == b"FAIL" and len(replies) >= 8 + size:
                reason = bytes(replies[8 : 8 + size]).decode("utf-8", "replace")
                raise ProfilerError(f"The phone refused a pushed file ({self._paths[self.confirmed]}): {reason}.")
            elif kind == b"FAIL":
                return  # the rest of the message is in the next WRTE
            else:
                raise ProfilerError(f"The phone answered a push with {kind!r}; expected OKAY or FAIL.")


def push_files(adb: AdbShellDevice, files: Sequence[tuple[str, bytes, int]], timeout_s: float) -> None:
    """Push `files` ((remote path, bytes, mode)) in one pipelined sync session.

    adb-shell's `push` opens a sync session per file and sends DATA in WRTEs of at most
    64 KiB, each waiting for its acknowledgement.  This sends every file's SEND/DATA/DONE
    back to back in WRTEs of the negotiated size (1 MiB) and reads the phone's per-file
    OKAYs as they come, as `adb push a b c dir/` does with deferred acknowledgements.
    """
    if not files:
        return
    stream = adb._open(b"sync:", timeout_s, timeout_s, None)
    replies = _SyncReplies([path for path, _, _ in files])
    maxdata: int = adb._maxdata

    def write(data: bytes) -> None:
        """One WRTE, then wait for its OKAY (ADB's flow control), taking the phone's WRTEs meanwhile."""
        adb._io_manager.send(_Message(constants.WRTE, stream.local_id, stream.remote_id, data), stream)
        while True:
            cmd, payload = adb._read_until([constants.OKAY, constants.WRTE, constants.CLSE], stream)
            if cmd == constants.OKAY:
                return
            replies.take(cmd, payload)

    pending = bytearray()
    for chunk in _sync_requests(files):
        pending += chunk
        while len(pending) >= maxdata:
            write(bytes(pending[:maxdata]))
            del pending[:maxdata]
    if pending:
        write(bytes(pending))
    while replies.confirmed < len(files):
        replies.take(*adb._read_until([constants.WRTE, constants.CLSE], stream))
    adb._clse(stream)


def _sync_requests(files: Sequence[tuple[str, bytes, int]], clock: Callable[[], float] = time.time) -> Iterator[bytes]:
    """The sync protocol's SEND, DATA (64 KiB at most) and DONE requests of each file."""
    mtime = int(clock())
    for path, data, mode in files:
        spec = f"{path},{mode}".encode()
        yield struct.pack("<4sI", b"SEND", len(spec)) + spec
        for start in range(0, len(data), _SYNC_DATA_MAX):
            chunk = data[start : start + _SYNC_DATA_MAX]
            yield struct.pack("<4sI", b"DATA", len(chunk)) + chunk
        yield struct.pack("<4sI", b"DONE", mtime)
