"""ChamNet's accuracy predictor and evolutionary search, on a recorded real LUT.

The accuracies here are a known function of the architecture (a stand-in for training, which
the end-to-end test does for real): the predictor must learn what FLOPs alone cannot tell,
and the search must find, within the LUT's budget, what the predictor rates highest.
"""
from __future__ import annotations

import numpy as np
import pytest

from adapter.search.chamnet.evolution import evolve
from adapter.search.chamnet.predictor import AccuracyPredictor, FlopsRegression, expected_improvement, macs, quality
from adapter.search.chamnet.space import Candidate, SearchSpace, SpaceError
from adapter.search.chamnet.specs import candidate_specs
from lut.latency import LatencyEstimator
from tests.test_fidelity_rules import _recorded_lut

pytestmark = pytest.mark.timeout(300)

V1_BASE = Candidate.parse("v1 r32 c16 | 32x1 64x2s2 128x2s2 256x6s2 512x2s2")
SPACE = SearchSpace.around(V1_BASE, step=16, grow=1.0)


def _accuracy(candidate: Candidate) -> float:
    """Saturating in the last stages' widths and in depth, indifferent to the stem's: not a function of MACs."""
    last, third = candidate.stages[-1].channels / 512, candidate.stages[-2].channels / 256
    return 0.6 + 0.2 * np.sqrt(last) + 0.1 * np.sqrt(third) + 0.01 * candidate.stages[-2].blocks


def test_the_predictor_ranks_held_out_candidates_better_than_flops():
    train, held_out = SPACE.sample(40, seed=0), SPACE.sample(60, seed=1)[40:]
    predictor = AccuracyPredictor(SPACE).fit(train, [_accuracy(c) for c in train])
    mean, std = predictor.predict(held_out)
    truth = [_accuracy(c) for c in held_out]
    gp, flops = quality(mean, truth), quality(FlopsRegression.fit(train, [_accuracy(c) for c in train], 10)
                                              .predict(held_out), truth)
    assert gp.n == 20 and gp.kendall_tau >= 0.6 and gp.kendall_tau > flops.kendall_tau, (gp, flops)
    assert gp.rmse_points < flops.rmse_points and (std > 0).all()
    ei = expected_improvement(mean, std, best=max(truth))
    assert (ei >= 0).all() and ei.argmax() in np.argsort(-(mean + std))[:5]
    with pytest.raises(SpaceError, match="not fitted"):
        AccuracyPredictor(SPACE).predict(train)


def test_macs_count_the_convolutions_of_a_candidate():
    assert macs(V1_BASE, 10) == sum(s.macs for s in candidate_specs(V1_BASE, 10))
    narrow = Candidate.parse("v1 r32 c16 | 32x1 64x2s2 128x2s2 256x6s2 256x2s2")
    assert macs(narrow, 10) < macs(V1_BASE, 10)


def test_the_search_finds_the_best_predicted_candidate_within_the_luts_budget(tmp_path):
    estimator = LatencyEstimator(_recorded_lut(tmp_path / "lut.sqlite", "v1a05_32"))

    def latency_ms(candidate):
        return estimator.total_us(candidate_specs(candidate, 10)) / 1000

    train = SPACE.sample(30, seed=0)
    predictor = AccuracyPredictor(SPACE).fit(train, [_accuracy(c) for c in train])
    budget = 0.6 * latency_ms(V1_BASE)
    result = evolve(SPACE, predictor, latency_ms, budget, top=5, population=32, generations=15, seed=0)
    assert len(result.top) == 5 and all(f.estimated_ms <= budget for f in result.top)
    assert [f.predicted_accuracy for f in result.top] == sorted((f.predicted_accuracy for f in result.top), reverse=True)
    # better than as many random candidates of the space that meet the budget
    rivals = [c for c in SPACE.sample(result.evaluated, seed=7) if latency_ms(c) <= budget]
    assert rivals and result.top[0].predicted_accuracy >= predictor.predict(rivals)[0].max()
    with pytest.raises(SpaceError, match=r"No candidate of the space meets 0\.0001 ms: the fastest seen"):
        evolve(SPACE, predictor, latency_ms, 1e-4, population=8, generations=2)
