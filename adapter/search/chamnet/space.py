"""ChamNet's search space as data: the hyper-parameters of a MobileNet around a trained base.

ChamNet (Dai et al., CVPR 2019) adapts an architecture's hyper-parameters instead of pruning
filters: per stage the output channels, the number of blocks and (MobileNetV2) the expansion
ratio, the stem's and the last 1×1 convolution's widths, and the input resolution. A
`Candidate` is one point of that space: a small frozen record with a stable text form (the
run store's key) and a numeric encoding in [0, 1]^d (the accuracy predictor's input).
A `SearchSpace` is the grid around a base model (`SearchSpace.around`): channels on the
LUT's step grid from one step up to `grow` times the base's, blocks from 1 up to the
base's (plus `extra_blocks`), expansions from a set, resolutions from a set. Strides stay
the base's: they fix where the feature map halves.

Layers are named as keras.applications names them (`block_3_expand`, `conv_pw_5`, ...), so a
candidate's model is one the rest of phonefit reads like the base (`lut`, pruning, export),
and `adapter.search.chamnet.build.inherit` finds the base weights of each of its layers.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from adapter.errors import AdapterError

__all__ = ["FAMILIES", "Candidate", "SearchSpace", "SpaceError", "Stage"]

FAMILIES = ("mobilenet_v1", "mobilenet_v2")
_SHORT = {"mobilenet_v1": "v1", "mobilenet_v2": "v2"}


class SpaceError(AdapterError):
    """A search space or candidate that cannot be: bad ranges, a text that does not parse."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """Blocks of one output width in a row; the first has the stage's stride."""

    channels: int
    blocks: int
    stride: int = 1
    expansion: int = 1  # MobileNetV2's inverted residual: expanded channels = input × expansion

    def text(self) -> str:
        return f"{self.channels}x{self.blocks}" + (f"e{self.expansion}" if self.expansion != 1 else "") + \
            (f"s{self.stride}" if self.stride != 1 else "")


_STAGE_RE = re.compile(r"^(\d+)x(\d+)(?:e(\d+))?(?:s(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One architecture of the space: `text()` is stable, `Candidate.parse` reads it back."""

    family: str
    resolution: int
    stem: int
    stages: tuple[Stage, ...]
    last: int = 0  # MobileNetV2's last 1×1 convolution (Conv_1); 0 for V1, which has none

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise SpaceError(f"`family` must be one of {FAMILIES}. Received: family={self.family!r}.")
        values = [self.resolution, self.stem, *(v for s in self.stages for v in (s.channels, s.blocks, s.stride,
                                                                                s.expansion))]
        if not self.stages or any(not isinstance(v, int) or v < 1 for v in values) or self.last < 0:
            raise SpaceError(f"A candidate needs stages and positive integer widths, blocks, strides and "
                             f"expansions. Received: {self!r}.")

    def text(self) -> str:
        """e.g. `v2 r32 c16 | 8x1 16x2e6s2 ... | l1280`."""
        tail = f" | l{self.last}" if self.last else ""
        return f"{_SHORT[self.family]} r{self.resolution} c{self.stem} | {' '.join(s.text() for s in self.stages)}{tail}"

    @classmethod
    def parse(cls, text: str) -> Candidate:
        parts = [p.strip() for p in text.split("|")]
        try:
            head = parts[0].split()
            family = {v: k for k, v in _SHORT.items()}[head[0]]
            resolution, stem = int(head[1].removeprefix("r")), int(head[2].removeprefix("c"))
            stages = []
            for token in parts[1].split():
                match = _STAGE_RE.match(token)
                if match is None:
                    raise ValueError(f"stage {token!r}")
                channels, blocks, expansion, stride = match.groups()
                stages.append(Stage(int(channels), int(blocks), int(stride or 1), int(expansion or 1)))
            last = int(parts[2].removeprefix("l")) if len(parts) > 2 else 0
        except (KeyError, IndexError, ValueError) as e:
            raise SpaceError(f"Not a candidate's text: expected e.g. 'v2 r32 c16 | 8x1 16x2e6s2 | l1280'. "
                             f"Received: {text!r}.") from e
        return cls(family, resolution, stem, tuple(stages), last)

    @property
    def blocks(self) -> int:
        return sum(s.blocks for s in self.stages)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The choices per hyper-parameter around `base` (see the module doc)."""

    base: Candidate
    step: int
    grow: float = 1.5
    extra_blocks: int = 0
    expansions: tuple[int, ...] = (1, 4, 5, 6)
    resolutions: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.step, int) or self.step < 1:
            raise SpaceError(f"`step` must be a positive integer. Received: step={self.step!r}.")
        if not (math.isfinite(self.grow) and self.grow >= 1):
            raise SpaceError(f"`grow` must be at least 1 (the base's widths). Received: grow={self.grow!r}.")
        if not self.expansions or any(e < 1 for e in self.expansions):
            raise SpaceError(f"`expansions` must be positive integers. Received: expansions={self.expansions!r}.")
        if any(r < 32 for r in self.resolutions):
            raise SpaceError(f"Resolutions must be at least 32 px. Received: resolutions={self.resolutions!r}.")

    @classmethod
    def around(cls, base: Candidate, step: int, **options) -> SearchSpace:
        return cls(base, step, **options)

    # ------------------------------------------------------------ the choices
    def _widths(self, base_width: int) -> list[int]:
        top = max(self.step, int(base_width * self.grow) // self.step * self.step)
        return list(range(self.step, top + 1, self.step))

    def choices(self) -> list[tuple[str, list[int]]]:
        """(name, values) per dimension, in the encoding's order."""
        dims: list[tuple[str, list[int]]] = [
            ("resolution", sorted(set(self.resolutions) | {self.base.resolution})),
            ("stem", self._widths(self.base.stem)),
        ]
        for i, stage in enumerate(self.base.stages):
            dims.append((f"stage{i}.channels", self._widths(stage.channels)))
            dims.append((f"stage{i}.blocks", list(range(1, stage.blocks + self.extra_blocks + 1))))
            if self.base.family == "mobilenet_v2" and stage.expansion != 1:
                dims.append((f"stage{i}.expansion", sorted(set(self.expansions))))
        if self.base.last:
            dims.append(("last", self._widths(self.base.last)))
        return dims

    @property
    def size(self) -> int:
        return math.prod(len(values) for _, values in self.choices())

    def decode(self, point: Sequence[float]) -> Candidate:
        """The candidate at `point` in [0, 1]^d: each coordinate picks one of its dimension's values."""
        dims = self.choices()
        if len(point) != len(dims):
            raise SpaceError(f"A point of this space has {len(dims)} coordinates. Received: {len(point)}.")
        picked = {name: values[min(len(values) - 1, int(float(u) * len(values)))] for (name, values), u in
                  zip(dims, point)}
        return self._candidate(picked)

    def at(self, indices: Sequence[int]) -> Candidate:
        """The candidate that picks value `indices[i]` of dimension i (the search's genome)."""
        return self.decode([(int(i) + 0.5) / len(values) for i, (_, values) in zip(indices, self.choices())])

    def encode(self, candidate: Candidate) -> np.ndarray:
        """`candidate` in [0, 1]^d: each value's position among its dimension's values (mid-cell),
        the inverse of `decode`; a value off the grid counts as the nearest one."""
        values = self._values(candidate)
        point = []
        for name, grid in self.choices():
            index = int(np.argmin([abs(g - values[name]) for g in grid]))
            point.append((index + 0.5) / len(grid))
        return np.asarray(point)

    def contains(self, candidate: Candidate) -> bool:
        values = self._values(candidate)
        return candidate.family == self.base.family and len(candidate.stages) == len(self.base.stages) and all(
            values[name] in grid for name, grid in self.choices())

    def sample(self, n: int, seed: int, keep: Callable[[Candidate], bool] | None = None) -> list[Candidate]:
        """`n` distinct candidates spread over the space by a scrambled Sobol sequence
        (quasi-Monte-Carlo: ChamNet's initial sample); with `keep`, over the part of it that
        `keep` accepts (the region the budgets lie in), in the sequence's order."""
        from scipy.stats import qmc

        sampler = qmc.Sobol(d=len(self.choices()), scramble=True, seed=seed)
        out: dict[str, Candidate] = {}
        for _ in range(64):
            for point in sampler.random(max(2, 2 ** math.ceil(math.log2(max(n, 2))))):
                candidate = self.decode(point)
                if keep is None or keep(candidate):
                    out.setdefault(candidate.text(), candidate)
                if len(out) == n:
                    return list(out.values())
        where = "distinct candidates" if keep is None else "distinct candidates in the region"
        raise SpaceError(f"The space holds fewer than {n} {where} ({len(out)} found); widen it.")

    # ------------------------------------------------------------ plumbing
    def _values(self, candidate: Candidate) -> dict[str, int]:
        values = {"resolution": candidate.resolution, "stem": candidate.stem, "last": candidate.last}
        for i, stage in enumerate(candidate.stages):
            values.update({f"stage{i}.channels": stage.channels, f"stage{i}.blocks": stage.blocks,
                           f"stage{i}.expansion": stage.expansion})
        return values

    def _candidate(self, picked: dict[str, int]) -> Candidate:
        stages = tuple(
            Stage(picked[f"stage{i}.channels"], picked[f"stage{i}.blocks"], base.stride,
                  picked.get(f"stage{i}.expansion", base.expansion))
            for i, base in enumerate(self.base.stages)
        )
        return Candidate(self.base.family, picked["resolution"], picked["stem"], stages, picked.get("last", 0))
