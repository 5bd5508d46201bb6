"""ChamNet's search: a genetic algorithm over the space, maximizing predicted accuracy with the
LUT's latency estimate within the budget.

pymoo's single-objective GA with integer genes (one per dimension: the index of its value)
does the evolution, with the budget as an inequality constraint (pymoo ranks infeasible
individuals by how far they are over it). Every evaluated candidate is kept, so the result
is the best feasible candidates ever seen, not only the last generation's. Both predictors
are cheap (the accuracy predictor is a fitted Gaussian process, the latency one a sum of LUT
entries over specs computed from the record), so a search of thousands of candidates takes
seconds and retargeting a stored predictor to another budget or LUT needs no training.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from adapter.search.chamnet.predictor import AccuracyPredictor
from adapter.search.chamnet.space import Candidate, SearchSpace, SpaceError

__all__ = ["Found", "SearchResult", "evolve"]


@dataclasses.dataclass(frozen=True)
class Found:
    candidate: Candidate
    predicted_accuracy: float
    estimated_ms: float


@dataclasses.dataclass(frozen=True)
class SearchResult:
    top: list[Found]
    evaluated: int
    feasible: int
    seconds: float


def evolve(space: SearchSpace, predictor: AccuracyPredictor, latency_ms: Callable[[Candidate], float],
           budget_ms: float, *, top: int = 5, population: int = 64, generations: int = 40,
           seed: int = 0) -> SearchResult:
    """The `top` candidates of highest predicted accuracy whose `latency_ms` is within `budget_ms`."""
    from pymoo.algorithms.soo.nonconvex.ga import GA
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.optimize import minimize

    start = time.perf_counter()
    sizes = [len(values) for _, values in space.choices()]
    seen: dict[str, Found] = {}

    class _Problem(Problem):
        def __init__(self):
            super().__init__(n_var=len(sizes), n_obj=1, n_ieq_constr=1, xl=np.zeros(len(sizes)),
                             xu=np.asarray(sizes) - 1, vtype=int)

        def _evaluate(self, x, out, *args, **kwargs):
            candidates = [space.at(np.rint(row).astype(int)) for row in x]
            fresh = [c for c in dict.fromkeys(candidates) if c.text() not in seen]
            if fresh:
                mean, _ = predictor.predict(fresh)
                for c, accuracy in zip(fresh, mean):
                    seen[c.text()] = Found(c, float(accuracy), float(latency_ms(c)))
            found = [seen[c.text()] for c in candidates]
            out["F"] = np.asarray([-f.predicted_accuracy for f in found])
            out["G"] = np.asarray([f.estimated_ms - budget_ms for f in found])

    algorithm = GA(pop_size=population, sampling=IntegerRandomSampling(),
                   crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
                   mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    minimize(_Problem(), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    feasible = sorted((f for f in seen.values() if f.estimated_ms <= budget_ms),
                      key=lambda f: (-f.predicted_accuracy, f.estimated_ms))
    if not feasible:
        fastest = min(seen.values(), key=lambda f: f.estimated_ms)
        raise SpaceError(f"No candidate of the space meets {budget_ms:.4g} ms: the fastest seen, "
                         f"{fastest.candidate.text()}, is estimated at {fastest.estimated_ms:.4g} ms. Widen the "
                         "space downwards (a smaller --step, lower resolutions) or relax the budget.")
    return SearchResult(feasible[:top], len(seen), len(feasible), time.perf_counter() - start)
