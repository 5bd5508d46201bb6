"""`parse_benchmark_output` on real benchmark_model outputs of many releases (tests/data/benchmark_outputs/).

Each file is an output as its source posted it; SOURCES.json names the source, the release
and the figures the parser must read from it.
"""
import json
import pathlib

import pytest

from profiler.benchmark_output import BenchmarkOutputError, parse_benchmark_output

CORPUS = pathlib.Path(__file__).parent / "data" / "benchmark_outputs"
INDEX = json.loads((CORPUS / "SOURCES.json").read_text())["outputs"]
FIELDS = ("avg_us", "count", "min_us", "max_us", "std_us", "median_us", "init_us", "first_us",
          "warmup_avg_us", "gpu_delegate", "nnapi_delegate")


def test_every_file_is_indexed_once_with_a_source_and_a_release():
    names = [entry["file"] for entry in INDEX]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(p.name for p in CORPUS.glob("*.txt"))
    assert all(entry["source"] and entry["release"] for entry in INDEX)
    assert all(("expect" in entry) != ("error" in entry) for entry in INDEX)


@pytest.mark.parametrize("entry", [e for e in INDEX if "expect" in e], ids=lambda e: e["file"])
def test_real_output_reads_every_expected_figure(entry):
    result = parse_benchmark_output((CORPUS / entry["file"]).read_text())
    expected = entry["expect"]
    assert set(expected) == set(FIELDS)  # every figure is stated, printed or not
    for field in FIELDS:
        want, got = expected[field], getattr(result, field)
        if isinstance(want, float | int) and not isinstance(want, bool):
            assert got == pytest.approx(want), field
        else:
            assert got == want, field
    assert result.avg_us > 0


@pytest.mark.parametrize("entry", [e for e in INDEX if "error" in e], ids=lambda e: e["file"])
def test_real_failed_run_raises_quoting_its_error(entry):
    with pytest.raises(BenchmarkOutputError, match=entry["error"]):
        parse_benchmark_output((CORPUS / entry["file"]).read_text())
