"""The estimate's cache context and the budget verdict, checked on recorded real measurements.

`tests/data/host_v1a05_32.csv.gz` is a LUT for MobileNetV1 α=0.5 at 32 px (step 16) built
on this project's development CPU on a quiet machine, with its cache context; and
`host_v1a05_32_wholes.json` holds 30 random prunings of that model measured whole there,
interleaved (5 rounds, median), by `python -m adapter.validate_lut --samples 30 --seed 0`.
"""
import csv
import gzip
import json
from pathlib import Path

import pytest

from lut.latency import CacheContext, LatencyEstimator
from lut.spec import LayerSpec
from lut.table import LatencyTable, Measurement

DATA = Path(__file__).parent / "data"


def _recorded_lut(path) -> LatencyTable:
    meta = json.loads((DATA / "host_v1a05_32_meta.json").read_text())
    table = LatencyTable.create(path, meta)
    with gzip.open(DATA / "host_v1a05_32.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))
    table.record_many((LayerSpec.from_key(r["key"]), Measurement(*(float(r["median_us"]),) * 4, 0.0, 1)) for r in rows)
    return table


@pytest.mark.timeout(300)
def test_the_cache_context_predicts_recorded_whole_models_the_entries_sum_misses(tmp_path):
    from adapter.pruning.surgery import prune_to_counts
    from lut.latency import specs_of
    from lut.models import build_model

    wholes = json.loads((DATA / "host_v1a05_32_wholes.json").read_text())
    model = build_model("mobilenet_v1", alpha=0.5, resolution=32, classes=10)
    with _recorded_lut(tmp_path / "lut.sqlite") as table:
        estimator = LatencyEstimator(table)
        assert isinstance(estimator.context, CacheContext)
        with_context, entries_only = [], []
        for variant in wholes["variants"]:
            specs = specs_of(prune_to_counts(model, variant["channels"]) if variant["channels"] else model)
            measured = variant["measured_us"]
            with_context.append(estimator.total_us(specs) / measured - 1)
            entries_only.append(estimator.entries_us(specs) / measured - 1)
    # the unpruned model's 3.3 MB of weights do not fit the 2 MiB L2: the entries' sum misses it by half
    assert entries_only[0] < -0.4 and abs(with_context[0]) < 0.10  # the entries alone: −47%
    within = sum(abs(e) <= 0.05 for e in with_context) / len(with_context)
    assert within >= 0.7 and max(map(abs, with_context)) <= 0.10, sorted(with_context)
    assert sum(abs(e) <= 0.05 for e in entries_only) / len(entries_only) < within


def test_a_model_that_fits_the_cache_pays_no_fetch_cost_and_one_far_beyond_pays_the_plateau():
    context = CacheContext(fetch_ns_per_byte=0.03, cache_bytes=2e6)
    small = [LayerSpec("conv2d", 1, 1, 64, 64)]  # 16 KB
    big = [LayerSpec("fully_connected", 1, 1, 1024, 1024)]  # 4 MB
    assert context.miss_fraction(small) == 0 and context.weight_cost_us(small) == 0
    assert context.miss_fraction(big) == context.plateau
    fetched = big[0].weight_bytes + context.activation_miss * big[0].activation_bytes
    assert context.weight_cost_us(big) == pytest.approx(context.plateau * 0.03 * fetched / 1000)


# --------------------------------------------------------------------------- verdicts


def _interleaved(original_us, adapted_us):
    from profiler.interleave import Interleaved

    return Interleaved({"original": tuple(original_us), "adapted": tuple(adapted_us)}, None, None)


@pytest.mark.parametrize("adapted, status", [
    ((60, 61, 59, 60, 60), "met"),
    ((63, 64, 63, 62, 63), "over budget"),  # 63% of the original against 60% (+3%)
    ((14, 14, 15, 14, 14), "over-pruned"),  # the demo: 14% reported as met
])
def test_a_relative_budget_is_judged_by_the_ratio_of_interleaved_medians(adapted, status):
    from adapter.final_check import budget_verdict
    from adapter.latency import Budget

    # a machine-wide slowdown in round 3 hits both models and cancels in the ratio
    original = (100, 101, 150, 99, 100)
    adapted = tuple(a * (1.5 if i == 2 else 1) for i, a in enumerate(adapted))
    verdict = budget_verdict(Budget(0.6, relative=True), _interleaved(original, adapted), measured_original_ms=None,
                             over_budget=0.03, over_pruned=0.10)
    assert verdict.status == status and verdict.requested_fraction == 0.6
    assert verdict.measured_fraction == pytest.approx(sorted(adapted)[2] / 100)
    assert verdict.met is (status != "over budget")


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
