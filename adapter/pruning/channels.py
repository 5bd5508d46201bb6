"""The channel vocabulary of the pruning engine: sources, segments, blocks, and their union-find.

A *source* is a set of channels created by one layer; the last axis of a tensor is
`Channels`, blocks of segments of sources (see `adapter.pruning.graph`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from adapter.errors import AdapterError
from lut.spec import UnsupportedLayerError

__all__ = ["Channels", "PruningError", "UnprunableLayerError"]


class PruningError(AdapterError):
    """Root of the errors raised by `adapter` for models, groups and channels it cannot use."""


class UnprunableLayerError(PruningError, UnsupportedLayerError):
    """A layer (or layer setting) the pruning engine cannot prune through.

    It is `lut.spec.UnsupportedLayerError`, the one class for "phonefit cannot key or prune
    this layer" whichever floor finds it, and a `PruningError`, as the engine's other errors.
    """


@dataclasses.dataclass(frozen=True)
class _Segment:
    source: int
    size: int


@dataclasses.dataclass(frozen=True)
class _Block:
    """`scale` repetitions of the segments' channels along the last axis (NHWC flatten)."""

    scale: int
    segments: tuple[_Segment, ...]

    @property
    def width(self) -> int:
        return sum(segment.size for segment in self.segments)


Channels = tuple[_Block, ...]


def _length(channels: Channels) -> int:
    return sum(block.scale * block.width for block in channels)


def _structure(channels: Channels) -> tuple:
    return tuple((b.scale, tuple(s.size for s in b.segments)) for b in channels)


def _segments(channels: Channels) -> Iterator[_Segment]:
    for block in channels:
        yield from block.segments


def _concatenated(parts: list[Channels]) -> Channels:
    blocks: list[_Block] = []
    for block in (b for part in parts for b in part):
        if blocks and blocks[-1].scale == 1 and block.scale == 1:
            blocks[-1] = _Block(1, blocks[-1].segments + block.segments)
        else:
            blocks.append(block)
    return tuple(blocks)


class _Sources:
    """Union-find over channel sources; a root carries the size, fixedness and producers."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.producers: list[list[str]] = []

    def new(self, size: int, producer: str | None = None) -> Channels:
        self._parent.append(len(self._parent))
        self.size.append(size)
        self.fixed.append(producer is None)
        self.producers.append([producer] if producer else [])
        return (_Block(1, (_Segment(len(self._parent) - 1, size),)),)

    def find(self, source: int) -> int:
        while self._parent[source] != source:
            self._parent[source] = self._parent[self._parent[source]]
            source = self._parent[source]
        return source

    def tie(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra
            self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
            self.producers[ra] += self.producers[rb]

    def fix(self, channels: Channels) -> None:
        for segment in _segments(channels):
            self.fixed[self.find(segment.source)] = True
