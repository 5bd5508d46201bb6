"""The estimate's cache context and the budget verdict, checked on recorded real measurements.

`tests/data/host_{v1,v2}a05_32.csv.gz` are LUTs for MobileNetV1 and V2 α=0.5 at 32 px (step 16)
built on this project's development CPU on a quiet machine, with their cache contexts and
invocation overheads (`*_meta.json`); `*_wholes.json` hold 30 random prunings of each model
measured whole there, interleaved (5 rounds, median), by `python -m adapter.validate_lut
--samples 30 --seed 1` (the command is in each file). The cache context's shape was fitted on
other prunings (seed 0) and other LUTs of the same models: these are held out from its fit.
`host_v2a05_32_amd*` are the same recordings of MobileNetV2 made on a second CPU (an AMD EPYC
VM), which the shape was not fitted on. `host_{v1,v2}a05_32_icx*` are the same recordings made
on a third CPU (an Intel Xeon Ice Lake VM, 1.25 MiB L2), whose cache contexts hold the ramp the
fetch sweep measured there (`CacheContext.ramp`), each entry the lower of two passes
(`profiler.build_lut.PASSES`); their entries are on the reference's quiet scale, as the LUT
reads them, and so are the whole models.
"""
import csv
import dataclasses
import functools
import gzip
import json
from pathlib import Path

import pytest

from lut.latency import CacheContext, LatencyEstimator
from lut.spec import LayerSpec
from lut.table import LatencyTable, Measurement

DATA = Path(__file__).parent / "data"


def _recorded_lut(path, name) -> LatencyTable:
    meta = json.loads((DATA / f"host_{name}_meta.json").read_text())
    table = LatencyTable.create(path, meta)
    with gzip.open(DATA / f"host_{name}.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))
    table.record_many((LayerSpec.from_key(r["key"]), Measurement(*(float(r["median_us"]),) * 4, 0.0, 1)) for r in rows)
    return table


@functools.cache
def _recorded_variants(name, family) -> tuple[tuple[list, float], ...]:
    """Each recorded variant of `name`'s wholes: its ops (pruned as recorded) and its measured µs.
    Pruning 30 Keras models is most of these tests' time; every rule is estimated on the same ones."""
    from adapter.pruning.surgery import prune_to_counts
    from lut.latency import specs_of
    from lut.models import build_model

    wholes = json.loads((DATA / f"host_{name}_wholes.json").read_text())
    model = build_model(family, alpha=0.5, resolution=32, classes=10)
    return tuple((specs_of(prune_to_counts(model, v["channels"]) if v["channels"] else model), v["measured_us"])
                 for v in wholes["variants"])


def _errors(tmp_path, name, family, overhead_us=None, op_in_overheads=None, linear_ramp=False):
    """Each recorded variant's relative error: with the cache context, by the entries alone.
    `op_in_overheads`: price a missing op's own state at that many invocation overheads (the
    rule before `CacheContext.op_state_bytes`) instead of in bytes at the device's fetch cost.
    `linear_ramp`: the fitted linear ramp instead of the one the device's sweep measured."""
    with _recorded_lut(tmp_path / f"{name}-{overhead_us}-{op_in_overheads}-{linear_ramp}.sqlite", name) as table:
        estimator = LatencyEstimator(table)
        assert isinstance(estimator.context, CacheContext)
        if overhead_us is not None:
            estimator.invoke_overhead_us = overhead_us
        if op_in_overheads is not None:
            context = estimator.context
            estimator.context = dataclasses.replace(context, op_state_bytes=op_in_overheads * estimator.invoke_overhead_us
                                                    * 1000 / context.fetch_ns_per_byte)
        if linear_ramp:
            estimator.context = dataclasses.replace(estimator.context, ramp=())
        with_context, entries_only = [], []
        for specs, measured in _recorded_variants(name, family):
            with_context.append(estimator.total_us(specs) / measured - 1)
            entries_only.append(estimator.entries_us(specs) / measured - 1)
    return with_context, entries_only


def _within(errors, tolerance=0.05):
    return sum(abs(e) <= tolerance for e in errors) / len(errors)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, family", [("v1a05_32", "mobilenet_v1"), ("v2a05_32", "mobilenet_v2")])
def test_the_cache_context_predicts_recorded_whole_models_the_entries_sum_misses(tmp_path, name, family):
    with_context, entries_only = _errors(tmp_path, name, family)
    # the unpruned model's weights (3.1 MiB for V1, 2.6 for V2) do not fit the 2 MiB L2: the entries' sum misses it by half
    assert entries_only[0] < -0.4 and abs(with_context[0]) < 0.10
    assert _within(with_context) >= 0.9 and max(map(abs, with_context)) <= 0.10, sorted(with_context)
    assert _within(entries_only) < _within(with_context)


@pytest.mark.timeout(300)
def test_the_invocation_overhead_is_the_chains_intercept_not_a_trivial_ops_latency(tmp_path):
    """Subtracting a trivial op's whole latency per op (0.46 µs measured alone, the rule before)
    takes each op's own cost inside the model away too: MobileNetV2's 67 ops fall short."""
    meta = json.loads((DATA / "host_v2a05_32_meta.json").read_text())
    intercept, _ = _errors(tmp_path, "v2a05_32", "mobilenet_v2")
    whole_op, _ = _errors(tmp_path, "v2a05_32", "mobilenet_v2", overhead_us=TRIVIAL_OP_ALONE_US)
    assert meta["invoke_overhead_us"] < TRIVIAL_OP_ALONE_US
    assert sum(whole_op) / len(whole_op) < sum(intercept) / len(intercept) - 0.04
    assert _within(whole_op) < _within(intercept)


TRIVIAL_OP_ALONE_US = 0.46  # the trivial op (profiler.build_lut.OVERHEAD_SPEC) measured alone on that CPU


@pytest.mark.timeout(600)
def test_a_missing_ops_state_is_priced_at_the_devices_fetch_cost_not_in_invocation_overheads(tmp_path):
    """`host_{v1,v2}a05_32_amd`: MobileNetV1/V2 α=0.5 at 32 px and 30 prunings each recorded on a
    second CPU, an AMD EPYC VM whose next cache level is fast (0.002–0.004 ns a byte against the
    development CPU's 0.028). Pricing each missing op at 0.72 invocation overheads, as the
    development CPU's fit did, overcharges every model there; in bytes at the device's own fetch
    cost, much less. On the development CPU's recordings the two rules agree. (V2's prunings stay
    +14% on average by the LUT there, +8% by the entries alone: what the shape does not yet
    capture.)"""
    def mean_abs(errors):
        return sum(map(abs, errors)) / len(errors)

    for name, family in (("v1a05_32_amd", "mobilenet_v1"), ("v2a05_32_amd", "mobilenet_v2")):
        in_bytes, _ = _errors(tmp_path, name, family)
        in_overheads, _ = _errors(tmp_path, name, family, op_in_overheads=0.72)
        assert abs(in_bytes[0]) < abs(in_overheads[0])  # the whole model: V1 −1.0% against +7.5%, V2 +6.4% against +25.9%
        assert mean_abs(in_bytes) < mean_abs(in_overheads) - 0.10  # V1 5.0% against 17.7%, V2 14.8% against 27.5%
    for name, family in (("v1a05_32", "mobilenet_v1"), ("v2a05_32", "mobilenet_v2")):
        a, _ = _errors(tmp_path, name, family)
        b, _ = _errors(tmp_path, name, family, op_in_overheads=0.72)
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 0.01


@pytest.mark.timeout(300)
def test_the_ramp_the_devices_sweep_measured_predicts_whole_models_where_the_fitted_linear_one_misses(tmp_path):
    """On the Ice Lake VM the share of the fetch cost rises between 0.75 and 2 MiB; the linear
    ramp fitted on the development CPU (2 MiB L2), 0.53–1.29 times the 1.35 MiB half-way size,
    charged MobileNetV1's mid-size prunings for misses they did not pay: with it the LUT was
    +4.3% over them on average (60% within ±5%), with the measured ramp +0.8% (87%, all within
    ±10%). MobileNetV2's prunings, which touch less, gain little: +2.9% (80%) and −2.9% (83%)."""
    measured = {family: _errors(tmp_path, name, family)[0]
                for name, family in (("v1a05_32_icx", "mobilenet_v1"), ("v2a05_32_icx", "mobilenet_v2"))}
    linear = {family: _errors(tmp_path, name, family, linear_ramp=True)[0]
              for name, family in (("v1a05_32_icx", "mobilenet_v1"), ("v2a05_32_icx", "mobilenet_v2"))}
    v1, v1_linear = measured["mobilenet_v1"], linear["mobilenet_v1"]
    v2 = measured["mobilenet_v2"]
    assert _within(v1) >= 0.85 and _within(v1) >= _within(v1_linear) + 0.2 and _within(v1, 0.10) == 1.0, sorted(v1)
    assert abs(sum(v1)) / 30 < 0.02 < 0.04 < sum(v1_linear) / 30
    assert _within(v2) >= 0.8 and _within(v2, 0.10) >= 0.95 and abs(sum(v2)) / 30 < 0.04, sorted(v2)


# the fetch sweep as the Ice Lake VM measured it (2026-12-07): each k-branch model's lowest median, µs
_ICX_SWEEP_US = {1: 3.02, 2: 5.40, 3: 8.29, 4: 13.74, 5: 24.38, 6: 41.32, 7: 55.39, 8: 67.22, 10: 85.38, 12: 102.1,
                 16: 137.2, 24: 209.6, 32: 280.3}


def test_the_fetch_sweep_measures_a_rising_ramp_and_the_caches_half_way_size(monkeypatch):
    from profiler import context as sweep

    monkeypatch.setattr(sweep, "_branch_model", lambda k: str(k).encode())
    measured = []

    def measure(items):
        for name, model in items:
            measured.append(name)
            us = _ICX_SWEEP_US[int(model)]
            yield name, Measurement(us, us, us, us, 0.0, 1)

    context = sweep.measure_cache_context(measure, invoke_overhead_us=0.58)
    assert len(measured) == 3 * len(sweep.FETCH_BRANCHES)  # interleaved rounds, each through every size
    sizes, shares = zip(*context.ramp)
    assert sizes[0] == 263_168 and list(sizes) == sorted(sizes) and len(sizes) == len(sweep.FETCH_BRANCHES)
    # k = 2 ran a little faster a branch than k = 1 (noise: load only adds time), so it stays at 0
    assert shares[:2] == (0.0, 0.0) and shares[2] < 0.05 and list(shares) == sorted(shares) and shares[-1] == 1.0
    assert 1.25 * 2**20 < context.cache_bytes < 1.5 * 2**20
    assert context.fetch_ns_per_byte == pytest.approx((280.3 - 0.58) / 32 / 263_168 * 1000 - (3.02 - 0.58) * 1000 / 263_168,
                                                      rel=0.05)
    # a model touching 0.5 MiB pays nothing, one touching 9 MB (past the sweep's largest) the plateau
    assert context.miss_fraction([LayerSpec("fully_connected", 1, 1, 360, 360)]) == 0
    assert context.miss_fraction([LayerSpec("fully_connected", 1, 1, 1500, 1500)]) == pytest.approx(context.plateau)


def test_a_ramp_that_falls_or_leaves_0_to_1_is_refused():
    from lut.spec import LutError

    with pytest.raises(LutError, match="ramp"):
        CacheContext(0.02, 1e6, ramp=((1e6, 0.5), (2e6, 0.3)))
    with pytest.raises(LutError, match="ramp"):
        CacheContext(0.02, 1e6, ramp=((1e6, 0.5), (2e6, 1.3)))


def test_a_model_that_fits_the_cache_pays_no_fetch_cost_and_one_far_beyond_pays_the_plateau():
    context = CacheContext(fetch_ns_per_byte=0.03, cache_bytes=2e6)
    small = [LayerSpec("conv2d", 1, 1, 64, 64)]  # 16 KB
    big = [LayerSpec("fully_connected", 1, 1, 1024, 1024)]  # 4 MB
    assert context.miss_fraction(small) == 0 and context.weight_cost_us(small) == 0
    assert context.miss_fraction(big) == context.plateau
    # the weights, a share of the activations and the op's own state, at the device's cost per byte
    fetched = big[0].weight_bytes + context.activation_miss * big[0].activation_bytes + context.op_state_bytes
    assert context.weight_cost_us(big) == pytest.approx(context.plateau * 0.03 * fetched / 1000)
    # a device whose next level is ten times faster pays a tenth for the same miss, the op's state too
    fast = CacheContext(fetch_ns_per_byte=0.003, cache_bytes=2e6)
    assert fast.weight_cost_us(big) == pytest.approx(context.weight_cost_us(big) / 10)


# --------------------------------------------------------------------------- verdicts


def _interleaved(original_us, adapted_us):
    from profiler.interleave import Interleaved

    return Interleaved({"original": tuple(original_us), "adapted": tuple(adapted_us)}, None, None)


@pytest.mark.parametrize("adapted, status", [
    ((60, 61, 59, 60, 60), "met"),
    ((63, 64, 63, 62, 63), "over budget"),  # 63% of the original against 60% (+3%)
    ((14, 14, 15, 14, 14), "over-pruned"),  # the demo: 14% reported as met
])
def test_a_relative_budget_is_judged_by_the_median_of_the_rounds_ratios(adapted, status):
    from adapter.final_check import budget_verdict
    from adapter.latency import Budget

    # a machine-wide slowdown in round 3 hits both models and cancels in the ratio
    original = (100, 101, 150, 99, 100)
    adapted = tuple(a * (1.5 if i == 2 else 1) for i, a in enumerate(adapted))
    verdict = budget_verdict(Budget(0.6, relative=True), _interleaved(original, adapted), measured_original_ms=None,
                             over_budget=0.03, over_pruned=0.10)
    assert verdict.status == status and verdict.requested_fraction == 0.6
    assert verdict.measured_fraction == pytest.approx(sorted(a / o for a, o in zip(adapted, original))[2])
    assert verdict.met is (status != "over budget")
    assert verdict.conditions["rounds_us"] == {"original": list(original), "adapted": list(adapted)}  # to audit


def test_a_device_that_changes_speed_mid_check_does_not_move_the_verdict():
    """The Ice Lake VM (2026-12-07, nothing else running) ran the demo's original at 260.3 µs and
    its adapted model at 153.0 (the median of 7 interleaved rounds), then at 1.8x that speed:
    145.0 and 81.8 µs (`/work/notes27/remeasure_final.py`); its final check had reported 78.9%
    for a model measured at 57.1% during the search. Here the switch comes between the two
    models of round 3: the ratio of the two medians takes them from different speeds (31%,
    "over-pruned"), the median of the rounds' ratios does not."""
    from adapter.final_check import budget_verdict
    from adapter.latency import Budget

    slow, fast = (260.3, 153.0), (145.0, 81.8)
    original = (slow[0], slow[0], slow[0], fast[0], fast[0])
    adapted = (slow[1], slow[1], fast[1], fast[1], fast[1])
    verdict = budget_verdict(Budget(0.6, relative=True), _interleaved(original, adapted), measured_original_ms=None,
                             over_budget=0.03, over_pruned=0.10)
    assert sorted(adapted)[2] / sorted(original)[2] < 0.6 * 0.9  # the ratio of medians: "over-pruned"
    assert verdict.status == "met" and verdict.measured_fraction == pytest.approx(fast[1] / fast[0])


class _Switching:
    """A device at the Ice Lake VM's two recorded speeds (the original 260.3 / 145.0 µs, the
    adapted model 153.0 / 81.8), fast in the measurements numbered in `fast` (from 0, one a model)."""

    name = "switching"
    SPEEDS = {"original": (260.3, 145.0), "adapted": (153.0, 81.8)}

    def __init__(self, fast):
        self.fast, self.calls = fast, 0

    def measure(self, models):
        from lut.table import Measurement

        for name, _ in models:
            us = self.SPEEDS[name][self.fast(self.calls)]
            self.calls += 1
            yield name, Measurement(us, us, us, us, 0.0, 10)


@pytest.mark.parametrize("fast, rounds, settled", [
    (lambda call: call >= 5, 5, True),  # one switch, inside round 3: one odd round of five leaves the median alone
    (lambda call: call in (3, 5) or call >= 10, 10, True),  # fast for the adapted model of rounds 2 and 3: 5 more
    (lambda call: call % 4 in (1, 2), 10, False),  # flickering every round: more rounds, at most MAX_ROUNDS
])
def test_a_verdicts_rounds_whose_ratios_spread_enough_to_move_the_median_are_followed_by_more(tmp_path, fast, rounds,
                                                                                              settled):
    from adapter.final_check import MAX_ROUNDS, ModelChecker

    checker = ModelChecker(_Switching(fast), None, b"original", tmp_path, rounds=5)
    result = checker.measure({"adapted": b"adapted"})
    assert len(result) == rounds <= MAX_ROUNDS and checker.last is result
    assert result.conditions()["rounds"] == rounds
    if settled:  # the median round is one at a single speed
        assert result.ratio("adapted", "original") in (pytest.approx(153.0 / 260.3), pytest.approx(81.8 / 145.0))
    # the search's own measurements take no more rounds
    assert len(ModelChecker(_Switching(fast), None, b"original", tmp_path, rounds=5)._measure(
        {"original": b"original", "adapted": b"adapted"})) == 5


def test_no_verdict_is_taken_when_the_device_stayed_disturbed():
    from adapter.final_check import budget_verdict
    from adapter.latency import Budget
    from profiler.interleave import Interleaved
    from profiler.monitor import Check

    disturbed = Interleaved({"original": (100.0,), "adapted": (60.0,)}, None, Check(130.0, 100.0, 1.0))
    verdict = budget_verdict(Budget.parse("12ms"), None, measured_original_ms=0.1, last=disturbed,
                             over_budget=0.03, over_pruned=0.10)
    assert verdict.status == "not taken" and verdict.met is None
    assert "+30.0% of its quiet 100.0 µs" in verdict.reason and "other processes used 1.0 cores" in verdict.reason
