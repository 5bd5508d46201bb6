"""NetAdapt's configuration: the schedule, the proposals' fine-tuning, the selection rule."""

from __future__ import annotations

import dataclasses
import math

from adapter.errors import AdapterError
from adapter.latency import Budget

__all__ = ["HOLDOUT_SIZE", "SELECTION_RULES", "NetAdaptConfig"]

SELECTION_RULES = ("accuracy", "accuracy_per_latency")
HOLDOUT_SIZE = 2000  # training images kept out to rank proposals (the default of every search command)


@dataclasses.dataclass(frozen=True)
class NetAdaptConfig:
    """How NetAdapt searches (schedule, proposals, fine-tuning, selection).

    The schedule removes `initial_reduction` of the original estimate in iteration 1 and
    `decay` times less in each next one, so it can remove at most
    `initial_reduction / (1 − decay)` of it in all: the paper's 0.025 and 0.96 saturate at
    62.5%, and a budget near that takes hundreds of iterations. The default decay 0.98
    reaches 50% of the original in about 26 iterations (budgets down to 25% stay within
    ~70); `run_netadapt` refuses a budget the schedule cannot reach.
    `step` None takes the LUT's channel grid step (its `step` meta, else 8).
    """

    budget: Budget
    initial_reduction: float = 0.025
    decay: float = 0.98
    step: int | None = None
    short_term_steps: int = 50
    batch_size: int = 128
    short_term_lr: float = 5e-4
    holdout_size: int = HOLDOUT_SIZE
    selection: str = "accuracy"
    long_term_epochs: int = 4
    long_term_lr: float = 1e-3
    optimizer: str = "adam"
    recalibration_images: int = 1024
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.budget, Budget):
            raise AdapterError(f"budget must be a Budget (e.g. Budget.parse('0.5')); received {self.budget!r}.")
        if not 0 < self.initial_reduction < 1:
            raise AdapterError(f"initial_reduction must be in (0, 1); received {self.initial_reduction!r}.")
        if not 0 < self.decay <= 1:
            raise AdapterError(f"decay must be in (0, 1]; received {self.decay!r}.")
        for name in ("short_term_steps", "batch_size", "holdout_size", "recalibration_images"):
            _require_positive_int(name, getattr(self, name))
        _require_positive_int("long_term_epochs", self.long_term_epochs, allow_zero=True)
        if self.step is not None:
            _require_positive_int("step", self.step)
        for name in ("short_term_lr", "long_term_lr"):
            if not getattr(self, name) > 0:
                raise AdapterError(f"{name} must be a positive number; received {getattr(self, name)!r}.")
        if self.selection not in SELECTION_RULES:
            raise AdapterError(f"Unknown selection rule {self.selection!r}: expected one of {list(SELECTION_RULES)}.")
        if self.optimizer not in ("adam", "sgd"):
            raise AdapterError(f"Unknown optimizer {self.optimizer!r}: expected 'adam' or 'sgd'.")

    def reduction_ms(self, iteration: int, original_ms: float) -> float:
        """The latency iteration `iteration` (from 1) must remove: Δ·decay^(i−1)."""
        return self.initial_reduction * original_ms * self.decay ** (iteration - 1)

    def max_reduction(self) -> float:
        """The fraction of the original latency the whole schedule can remove."""
        return math.inf if self.decay == 1 else self.initial_reduction / (1 - self.decay)

    def iterations_needed(self, fraction: float) -> int:
        """Iterations the schedule takes to remove `fraction` of the original (if each meets its target)."""
        if fraction <= 0:
            return 0
        if self.decay == 1:
            return math.ceil(fraction / self.initial_reduction)
        return math.ceil(math.log(1 - fraction * (1 - self.decay) / self.initial_reduction) / math.log(self.decay))

    def to_json(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["budget"] = dataclasses.asdict(self.budget)
        return fields


def _require_positive_int(name: str, value, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        kind = "an integer ≥ 0" if allow_zero else "a positive integer"
        raise AdapterError(f"{name} must be {kind}; received {name}={value!r}.")
