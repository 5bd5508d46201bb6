"""ChamNet's accuracy predictor: a Gaussian process from a candidate's encoding to its accuracy.

The predictor does not depend on the device: it is fitted once on candidates that were
really trained (a scrambled Sobol sample, then rounds of Bayesian optimization picking where
expected improvement is highest among candidates that meet a budget), and reused for any
LUT and budget. scikit-learn's `GaussianProcessRegressor` does the work: a Matérn-5/2
kernel with one length scale per dimension (some hyper-parameters matter more than others),
a fitted noise term (training is noisy: seeds, holdout sampling) and normalized targets.

Its quality is told on candidates it was not fitted on — RMSE in accuracy points and
Kendall's τ (the search only needs the order right) — next to a FLOPs-only regression
(accuracy linear in log MACs) fitted on the same points: the baseline a predictor must beat.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from adapter.search.chamnet.space import Candidate, SearchSpace, SpaceError
from adapter.search.chamnet.specs import candidate_specs

__all__ = ["AccuracyPredictor", "FlopsRegression", "Quality", "expected_improvement", "macs", "quality"]


def macs(candidate: Candidate, classes: int) -> int:
    return sum(spec.macs for spec in candidate_specs(candidate, classes))


class AccuracyPredictor:
    """A Gaussian process over `space`'s encoding; `fit` on trained candidates, then `predict`."""

    def __init__(self, space: SearchSpace, seed: int = 0):
        self.space, self.seed = space, seed
        self._gp: Any = None  # a fitted sklearn GaussianProcessRegressor

    def fit(self, candidates: Sequence[Candidate], accuracies: Sequence[float]) -> AccuracyPredictor:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        if len(candidates) != len(accuracies) or len(candidates) < 3:
            raise SpaceError(f"The predictor needs at least 3 trained candidates, each with its accuracy. "
                             f"Received: {len(candidates)} candidates, {len(accuracies)} accuracies.")
        x = np.stack([self.space.encode(c) for c in candidates])
        dims = x.shape[1]
        kernel = ConstantKernel(1.0, (1e-2, 1e2)) * Matern(np.ones(dims), (1e-2, 1e2), nu=2.5) + \
            WhiteKernel(1e-2, (1e-6, 1.0))
        gp = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=3, random_state=self.seed)
        with warnings.catch_warnings():
            # a length scale at its upper bound is a dimension that does not matter (what one scale per
            # dimension is for), a noise at its lower bound a repeatable recipe: both are answers, not faults
            warnings.simplefilter("ignore", ConvergenceWarning)
            gp.fit(x, np.asarray(accuracies, dtype=float))
        self._gp = gp
        return self

    def predict(self, candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted accuracy and its standard deviation, per candidate."""
        if self._gp is None:
            raise SpaceError("The predictor is not fitted: call fit() with trained candidates first.")
        mean, std = self._gp.predict(np.stack([self.space.encode(c) for c in candidates]), return_std=True)
        return mean, std


@dataclasses.dataclass(frozen=True)
class FlopsRegression:
    """Accuracy as a straight line in log MACs: the baseline a learned predictor must beat."""

    slope: float
    intercept: float
    classes: int

    @classmethod
    def fit(cls, candidates: Sequence[Candidate], accuracies: Sequence[float], classes: int) -> FlopsRegression:
        x = np.log([macs(c, classes) for c in candidates])
        slope, intercept = np.polyfit(x, np.asarray(accuracies, dtype=float), 1)
        return cls(float(slope), float(intercept), classes)

    def predict(self, candidates: Sequence[Candidate]) -> np.ndarray:
        return self.intercept + self.slope * np.log([macs(c, self.classes) for c in candidates])


@dataclasses.dataclass(frozen=True)
class Quality:
    """How well predictions rank and hit held-out accuracies."""

    n: int
    rmse_points: float  # in accuracy percentage points
    kendall_tau: float

    def __str__(self) -> str:
        return f"Kendall τ {self.kendall_tau:.2f}, RMSE {self.rmse_points:.2f} points on {self.n} held-out candidates"


def quality(predicted: npt.ArrayLike, measured: npt.ArrayLike) -> Quality:
    from scipy.stats import kendalltau

    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    tau = kendalltau(p, m).statistic
    return Quality(len(m), float(100 * math.sqrt(np.mean((p - m) ** 2))), float(0.0 if np.isnan(tau) else tau))


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float, xi: float = 0.0) -> np.ndarray:
    """Expected improvement over `best` (maximizing): ChamNet's acquisition for the next candidates."""
    from scipy.stats import norm

    std = np.maximum(std, 1e-12)
    z = (mean - best - xi) / std
    return (mean - best - xi) * norm.cdf(z) + std * norm.pdf(z)
