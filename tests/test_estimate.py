import statistics
import subprocess
import sys

import pytest

from lut.keras_specs import specs_of_keras
from lut.latency import LatencyEstimator, estimate_latency_ms
from lut.spec import LayerSpec, LutError
from lut.table import LatencyTable, Measurement

META = {"device": "host", "backend": "cpu", "threads": 1, "delegate": "xnnpack", "flags": "", "step": 8}
CONV = LayerSpec("conv2d", 16, 16, 8, 8, activation="relu6")


def _m(us: float) -> Measurement:
    return Measurement(median_us=us, mean_us=us, min_us=us, max_us=us, std_us=0.0, count=1)


def _tiled_latency(cin: int, cout: int) -> float:
    """A conv on 16-channel output tiles: linear in cin, a staircase in cout."""
    tiles = -(-cout // 16)
    return 3 + 0.5 * cin + 4.0 * tiles + 0.16 * cin * tiles


def _tiled_table(path):
    """Latency of `_tiled_latency` on a step-16 grid: the interpolation rule is exact on it."""
    table = LatencyTable.create(path, META)
    for cin in range(16, 129, 16):
        for cout in range(16, 129, 16):
            table.record(CONV.replace(cin=cin, cout=cout), _m(_tiled_latency(cin, cout)))
    for c in range(16, 129, 16):
        table.record(LayerSpec("depthwise_conv2d", 16, 16, c, c, (3, 3)), _m(2.0 * c))
    return table


def test_interpolation_is_linear_in_cin_and_takes_the_tile_top_in_cout(tmp_path):
    with _tiled_table(tmp_path / "lut.sqlite") as table:
        estimator = LatencyEstimator(table)
        for cin, cout in [(24, 40), (100, 17), (16, 120), (128, 72)]:
            assert estimator.spec_us(CONV.replace(cin=cin, cout=cout)) == pytest.approx(_tiled_latency(cin, cout))
        # a depthwise conv's channels are tiled too: 40 costs what 48 does
        assert estimator.spec_us(LayerSpec("depthwise_conv2d", 16, 16, 40, 40, (3, 3))) == pytest.approx(96.0)


def test_outside_the_measured_range_raises_naming_the_spec(tmp_path):
    with _tiled_table(tmp_path / "lut.sqlite") as table:
        estimator = LatencyEstimator(table)
        beyond = CONV.replace(cin=136, cout=16)
        with pytest.raises(LutError, match=beyond.key):
            estimator.spec_us(beyond)
        with pytest.raises(LutError, match="no entry of the kind"):
            estimator.spec_us(CONV.replace(kernel=(5, 5)))
        assert estimator.missing([beyond, CONV.replace(cin=24, cout=24)]) == [beyond]


def test_interpolation_error_on_held_out_entries_of_a_recorded_real_conv_family():
    """A real conv family measured on a quiet machine (`benchmarks/bench_interpolation.py --save`):
    keep its step-16 grid, predict the 85 entries in between with the rule and with bilinear."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("bench_interpolation", root / "benchmarks" / "bench_interpolation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recorded = json.loads((root / "tests" / "data" / "conv_family_host.json").read_text())
    measured = {(e["cin"], e["cout"]): e["median_us"] for e in recorded["entries"]}
    rule, bilinear = bench.held_out_errors(measured)
    assert len(measured) == 121 and len(rule) == len(bilinear) == 121 - 36
    # recorded: the rule's median 4.2% and p90 14.5%; bilinear's 8.4% and 26.6%
    assert statistics.median(rule) == pytest.approx(0.042, abs=0.001)
    assert statistics.median(bilinear) > 1.5 * statistics.median(rule)
    assert sorted(bilinear)[76] > 1.5 * sorted(rule)[76]


def test_estimate_of_a_model_is_the_sum_of_its_entries(tmp_path, tiny_v1):
    specs = specs_of_keras(tiny_v1)
    with LatencyTable.create(tmp_path / "lut.sqlite", META) as table:
        table.record_many((s, _m(10.0 + i)) for i, s in enumerate(dict.fromkeys(specs)))
        index = {s: 10.0 + i for i, s in enumerate(dict.fromkeys(specs))}
        assert estimate_latency_ms(tiny_v1, table) == pytest.approx(sum(index[s] for s in specs) / 1000)


def test_estimate_counts_the_invocation_overhead_once(tmp_path, tiny_v1):
    specs = specs_of_keras(tiny_v1)
    with LatencyTable.create(tmp_path / "lut.sqlite", META) as table:
        table.record_many((s, _m(10.0)) for s in specs)
        table.set_meta({"invoke_overhead_us": 0.5})
        assert LatencyEstimator(table).total_us(specs) == pytest.approx(10.0 * len(specs) - 0.5 * (len(specs) - 1))


def test_estimate_cli_reads_keras_and_tflite_files(tmp_path, tiny_v1):
    from profiler.convert import keras_to_tflite

    keras_path, tflite_path = tmp_path / "m.keras", tmp_path / "m.tflite"
    tiny_v1.save(keras_path)
    tflite_path.write_bytes(keras_to_tflite(tiny_v1))
    specs = specs_of_keras(tiny_v1)
    with LatencyTable.create(tmp_path / "lut.sqlite", META) as table:
        table.record_many((s, _m(100.0)) for s in specs)
    for model in (keras_path, tflite_path):
        run = subprocess.run(
            [sys.executable, "-m", "lut.estimate", "--lut", str(tmp_path / "lut.sqlite"), str(model)],
            capture_output=True, text=True,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"{len(specs) * 0.1:.3f} ms")
    bad = subprocess.run(
        [sys.executable, "-m", "lut.estimate", "--lut", str(tmp_path / "nope.sqlite"), str(keras_path)],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("python -m lut.estimate: error: No LUT file at") and "Traceback" not in bad.stderr
