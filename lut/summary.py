"""How far a LUT's estimates are from whole-model measurements: the error figures of a validation.

Pure arithmetic, so that the figures `adapter.validate_lut` prints can be checked on recorded
measurements (`tests/test_fidelity_rules.py`) without a device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lut.errors import LutError

__all__ = ["summarize"]


def summarize(predicted_us: Sequence[float], measured_us: Sequence[float]) -> dict[str, float]:
    """Error figures of predictions against measurements (percent errors relative to measured)."""
    errors = [(p - m) / m for p, m in zip(predicted_us, measured_us, strict=True)]
    n = len(errors)
    if n == 0:
        raise LutError("Nothing to summarize: no variant was measured.")
    return {
        "n": n,
        "within_5pct": sum(abs(e) <= 0.05 for e in errors) / n,
        "within_10pct": sum(abs(e) <= 0.10 for e in errors) / n,
        "rmspe": 100 * math.sqrt(sum(e * e for e in errors) / n),
        "mean_abs_pct_err": 100 * sum(abs(e) for e in errors) / n,
        "mean_pct_err": 100 * sum(errors) / n,
    }
