"""`parse_benchmark_output` on representative benchmark_model outputs (no device needed)."""
import pytest

import profiler
from profiler.benchmark_output import BenchmarkOutputError, BenchmarkResult, parse_benchmark_output
from profiler.errors import ProfilerError

# A recent Android build, CPU with XNNPACK: parameters are echoed with an INFO: prefix and
# the statistics lines carry percentiles.
NEW_CPU_WITH_PERCENTILES = """\
INFO: STARTING!
INFO: Log parameter values verbosely: [0]
INFO: Num threads: [1]
INFO: Graph: [/data/local/tmp/phonefit/b0/models/conv.tflite]
INFO: Signature to run: []
INFO: #threads used for CPU inference: [1]
INFO: Loaded model /data/local/tmp/phonefit/b0/models/conv.tflite
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
INFO: Explicitly applied XNNPACK delegate, and the model graph will be completely executed by the delegate.
INFO: The input model file size (MB): 0.010312
INFO: Initialized session in 2.113ms.
INFO: Running benchmark for at least 20 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=3412 first=401 curr=139 min=131 max=401 avg=146.52 std=12 p5=134 median=143 p95=168

INFO: Running benchmark for at least 100 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=7020 first=142 curr=140 min=130 max=512 avg=142.31 std=9 p5=133 median=141 p95=157

INFO: Inference timings in us: Init: 2113, First inference: 401, Warmup (avg): 146.52, Inference (avg): 142.31
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=1.5 overall=2.25
"""

# The 2.x format without percentiles and without a log prefix; one warm-up run printed short.
NEW_CPU_PLAIN = """\
STARTING!
Num threads: [4]
Graph: [mobilenet.tflite]
Loaded model mobilenet.tflite
Initialized session in 17.187ms.
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=1 curr=3512391

Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=2990275 curr=2913402 min=2727568 max=3189954 avg=2.95034e+06 std=109798

Inference timings in us: Init: 17187, First inference: 3512391, Warmup (avg): 3.51239e+06, Inference (avg): 2.95034e+06
"""

# TFLite 1.x: `Average inference timings in us: Warmup: …, Init: …, no stats: …`.
OLD_NO_STATS = """\
STARTING!
Num runs: [50]
Inter-run delay (seconds): [-1]
Num threads: [1]
Min warmup runs: [1]
Graph: [/data/local/tmp/mobilenet_v2_quant.tflite]
Use nnapi : [0]
Loaded model /data/local/tmp/mobilenet_v2_quant.tflite
resolved reporter
Initialized session in 1.892ms
Running benchmark for at least 1 iterations and at least 0.5 seconds
count=6 first=91810 curr=85097 min=84834 max=91810 avg=86184.3 std=2519

Running benchmark for at least 50 iterations and at least 1 seconds
count=50 first=118810 curr=114219 min=88216 max=129193 avg=115062 std=7678

Average inference timings in us: Warmup: 86184.3, Init: 1892, no stats: 115062
"""

# The benchmark app's logcat form of the old summary, with op profiling: the op table's
# `Timings (microseconds): count=…` line is a sum over ops, not the measured run.
OLD_LOGCAT_WITH_PROFILING = """\
04-09 10:01:02.100  4242  4242 I tflite  : count=5 first=84001 curr=80211 min=80100 max=84001 avg=81002 std=1400
04-09 10:01:03.200  4242  4242 I tflite  : count=50 first=79449 curr=81350 min=77385 max=88213 avg=79760.9 std=1929
04-09 10:01:03.300  4242  4242 I tflite  : ============================== Summary by node type ==============================
04-09 10:01:03.300  4242  4242 I tflite  : Timings (microseconds): count=50 first=79001 curr=80001 min=77000 max=88000 avg=79200 std=1900
04-09 10:01:03.300  4242  4242 I tflite  : Memory (bytes): count=0
04-09 10:01:03.400  4242  4242 I tflite  : Average inference timings in us: Warmup: 83235, Init: 38467, Inference: 79760.9
"""

GPU_FULL = """\
INFO: STARTING!
INFO: Graph: [/data/local/tmp/phonefit/b0/models/dw.tflite]
INFO: Use gpu: [1]
INFO: Loaded model /data/local/tmp/phonefit/b0/models/dw.tflite
INFO: Created TensorFlow Lite delegate for GPU.
INFO: GPU delegate created.
INFO: Loaded OpenCL library with dlopen.
VERBOSE: Replacing 1 out of 1 node(s) with delegate (TfLiteGpuDelegateV2) node, yielding 1 partitions for the whole graph.
INFO: Initialized OpenCL-based API.
INFO: Created 1 GPU delegate kernels.
INFO: Explicitly applied GPU delegate, and the model graph will be completely executed by the delegate.
INFO: Initialized session in 301.5ms.
INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=2011 first=1980 curr=240 min=221 max=1980 avg=248.6 std=40

INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=4102 first=239 curr=243 min=218 max=390 avg=243.8 std=11

INFO: Inference timings in us: Init: 301500, First inference: 1980, Warmup (avg): 248.6, Inference (avg): 243.8
"""

GPU_PARTIAL = """\
INFO: Use gpu: [1]
INFO: Loaded model /data/local/tmp/phonefit/b0/models/mean.tflite
INFO: Created TensorFlow Lite delegate for GPU.
INFO: GPU delegate created.
VERBOSE: Replacing 2 out of 3 node(s) with delegate (TfLiteGpuDelegateV2) node, yielding 2 partitions for the whole graph.
INFO: Created 2 GPU delegate kernels.
INFO: Explicitly applied GPU delegate, and the model graph will be partially executed by the delegate w/ 2 delegate kernels.
INFO: Initialized session in 280.1ms.
INFO: count=300 first=900 curr=610 min=580 max=900 avg=611 std=20
INFO: count=1600 first=612 curr=608 min=575 max=700 avg=609.5 std=9
INFO: Inference timings in us: Init: 280100, First inference: 900, Warmup (avg): 611, Inference (avg): 609.5
"""

GPU_NONE = """\
INFO: Use gpu: [1]
INFO: Loaded model /data/local/tmp/phonefit/b0/models/pad.tflite
INFO: Created TensorFlow Lite delegate for GPU.
ERROR: Following operations are not supported by GPU delegate:
PAD: Operation is not supported.
No operations will run on the GPU, and all 1 operations will run on the CPU.
INFO: Though GPU delegate is explicitly applied, the model graph will not be executed by the delegate.
INFO: count=900 first=60 curr=41 min=39 max=60 avg=41.2 std=2
INFO: count=3000 first=41 curr=40 min=38 max=55 avg=40.4 std=1
INFO: Inference timings in us: Init: 5100, First inference: 60, Warmup (avg): 41.2, Inference (avg): 40.4
"""

# Only TFLite's own delegate log says what happened (older builds print no verdict line).
GPU_REPLACING_ONLY_PARTIAL = """\
Use gpu : [1]
Loaded model x.tflite
INFO: Initialized TensorFlow Lite runtime.
INFO: Created TensorFlow Lite delegate for GPU.
INFO: Replacing 3 out of 4 node(s) with delegate (TfLiteGpuDelegateV2) node, yielding 2 partitions.
Initialized session in 250.2ms
count=10 first=800 curr=700 min=690 max=800 avg=711 std=30
count=50 first=702 curr=699 min=690 max=720 avg=701 std=5
Average inference timings in us: Warmup: 711, Init: 250200, no stats: 701
"""

# A GPU run that asked for the delegate but says nothing about how it was applied.
GPU_REQUESTED_SILENT = """\
Use gpu : [1]
Loaded model x.tflite
count=10 first=800 curr=700 min=690 max=800 avg=711 std=30
count=50 first=702 curr=699 min=690 max=720 avg=701 std=5
Average inference timings in us: Warmup: 711, Init: 250200, no stats: 701
"""

# --num_runs=1 --min_secs=0: the measured phase ran once and is printed in the short form.
SINGLE_RUN = """\
INFO: count=1 curr=512 p5=512 median=512 p95=512

INFO: count=1 curr=230 p5=230 median=230 p95=230

INFO: Inference timings in us: Init: 800, First inference: 512, Warmup (avg): 512, Inference (avg): 230
"""


def test_new_format_with_percentiles_reads_the_measured_phase_not_the_warmup():
    result = parse_benchmark_output(NEW_CPU_WITH_PERCENTILES)
    assert result == BenchmarkResult(
        avg_us=142.31, std_us=9, min_us=130, max_us=512, count=7020,
        init_us=2113, first_us=401, warmup_avg_us=146.52, median_us=141, gpu_delegate=None,
    )


def test_new_format_scientific_notation_and_short_warmup_line():
    result = parse_benchmark_output(NEW_CPU_PLAIN)
    assert result.avg_us == pytest.approx(2.95034e6)
    assert (result.min_us, result.max_us, result.std_us, result.count) == (2727568, 3189954, 109798, 50)
    assert (result.init_us, result.first_us, result.warmup_avg_us) == (17187, 3512391, pytest.approx(3.51239e6))
    assert result.median_us is None
    assert result.gpu_delegate is None


def test_old_format_has_no_first_inference():
    result = parse_benchmark_output(OLD_NO_STATS)
    assert (result.avg_us, result.std_us, result.min_us, result.max_us, result.count) == (115062, 7678, 88216, 129193, 50)
    assert (result.init_us, result.warmup_avg_us) == (1892, 86184.3)
    assert result.first_us is None
    assert result.median_us is None


def test_old_logcat_format_ignores_the_op_profiling_timings_line():
    result = parse_benchmark_output(OLD_LOGCAT_WITH_PROFILING)
    assert (result.avg_us, result.min_us, result.max_us, result.count) == (79760.9, 77385, 88213, 50)
    assert (result.init_us, result.warmup_avg_us, result.first_us) == (38467, 83235, None)


def test_single_measured_run_in_short_form():
    result = parse_benchmark_output(SINGLE_RUN)
    assert (result.avg_us, result.min_us, result.max_us, result.std_us, result.count) == (230, 230, 230, 0, 1)
    assert result.median_us == 230
    assert result.first_us == 512


@pytest.mark.parametrize(
    "text, state, evidence",
    [
        (GPU_FULL, "full", "completely executed"),
        (GPU_PARTIAL, "partial", "partially executed by the delegate w/ 2"),
        (GPU_NONE, "none", "will not be executed"),
        (GPU_REPLACING_ONLY_PARTIAL, "partial", "Replacing 3 out of 4"),
        (GPU_REQUESTED_SILENT, "none", "Use gpu : [1]"),
        (NEW_CPU_WITH_PERCENTILES, None, None),
        (OLD_NO_STATS.replace("Use nnapi : [0]", "Use gpu : [1]").replace("resolved reporter",
         "Applied GPU delegate, and the model graph will be completely executed w/ the delegate."), "full", "w/ the delegate"),
    ],
)
def test_gpu_delegate_state_and_the_line_that_decided_it(text, state, evidence):
    result = parse_benchmark_output(text)
    assert result.gpu_delegate == state
    if evidence is None:
        assert result.gpu_delegate_line is None
    else:
        assert evidence in result.gpu_delegate_line


NNAPI_TWO_DELEGATES = GPU_FULL.replace(
    "INFO: Explicitly applied GPU delegate, and the model graph will be completely executed by the delegate.",
    "INFO: Explicitly applied GPU delegate, and the model graph will be completely executed by the delegate.\n"
    "INFO: Though NNAPI delegate is explicitly applied, the model graph will not be executed by the delegate.",
).replace("INFO: Use gpu: [1]", "INFO: Use gpu: [1]\nINFO: Use NNAPI: [1]")


@pytest.mark.parametrize(
    "text, state, evidence",
    [
        (NNAPI_TWO_DELEGATES, "none", "Though NNAPI delegate"),
        ("Use nnapi : [1]\n" + OLD_NO_STATS.replace("Use nnapi : [0]\n", ""), "none", "Use nnapi : [1]"),
        ("INFO: Replacing 31 out of 31 node(s) with delegate (TfLiteNnapiDelegate) node, yielding 1 partitions for"
         " the whole graph.\n" + SINGLE_RUN, "full", "31 out of 31"),
        ("Explicitly applied NNAPI delegate, and the model graph will be partially executed by the delegate w/ 11"
         " delegate kernels.\n" + SINGLE_RUN, "partial", "w/ 11"),
        ("WARN: NNAPI acceleration is unsupported on this platform.\n" + SINGLE_RUN, "none", "unsupported"),
        (OLD_NO_STATS, None, None),
        (GPU_FULL, None, None),
    ],
)
def test_nnapi_delegate_state_from_the_same_table(text, state, evidence):
    result = parse_benchmark_output(text)
    assert result.nnapi_delegate == state
    assert (result.nnapi_delegate_line is None) == (evidence is None)
    if evidence is not None:
        assert evidence in result.nnapi_delegate_line


def test_two_delegates_are_judged_apart():
    result = parse_benchmark_output(NNAPI_TWO_DELEGATES)
    assert (result.gpu_delegate, result.nnapi_delegate) == ("full", "none")


def test_gpu_full_timings():
    result = parse_benchmark_output(GPU_FULL)
    assert (result.avg_us, result.count, result.init_us) == (243.8, 4102, 301500)


def test_garbage_raises_quoting_the_lines():
    with pytest.raises(BenchmarkOutputError, match="not a benchmark_model run.*'Segmentation fault'") as info:
        parse_benchmark_output("hello\nSegmentation fault\n\x00\x01binary")
    assert isinstance(info.value, ProfilerError)


def test_errors_are_quoted_first():
    text = "STARTING!\nGraph: [m.tflite]\nERROR: Failed to mmap model m.tflite\nERROR: Benchmarking failed.\n"
    with pytest.raises(BenchmarkOutputError, match="Failed to mmap model m.tflite"):
        parse_benchmark_output(text)


def test_empty_output_raises():
    with pytest.raises(BenchmarkOutputError, match="printed nothing"):
        parse_benchmark_output("  \n\n")


def test_truncated_after_the_warmup_raises_instead_of_reporting_the_warmup():
    cut = NEW_CPU_WITH_PERCENTILES.split("INFO: Running benchmark for at least 100")[0]
    with pytest.raises(BenchmarkOutputError, match="stops before its `Inference timings in us:` summary"):
        parse_benchmark_output(cut)


def test_truncated_in_the_middle_of_the_last_line_raises():
    cut = NEW_CPU_PLAIN[: NEW_CPU_PLAIN.index("Inference timings") + 30]
    with pytest.raises(BenchmarkOutputError, match="summary line is cut short after 'Init'"):
        parse_benchmark_output(cut)
    cut = NEW_CPU_PLAIN[: NEW_CPU_PLAIN.index("Inference (avg)")]
    with pytest.raises(BenchmarkOutputError, match="summary line has no inference average"):
        parse_benchmark_output(cut)


def test_summary_without_statistics_gives_the_summary_average_and_no_spread():
    result = parse_benchmark_output("Inference timings in us: Init: 1, First inference: 2, Warmup (avg): 3, Inference (avg): 4\n")
    assert (result.avg_us, result.init_us, result.first_us, result.warmup_avg_us) == (4, 1, 2, 3)
    assert (result.count, result.min_us, result.max_us, result.std_us, result.median_us) == (None,) * 5
    assert not result.has_statistics


def test_old_summary_without_statistics_ignores_the_op_profiling_timings():
    text = OLD_LOGCAT_WITH_PROFILING.replace("count=5 first", "x").replace("count=50 first=79449", "x")
    result = parse_benchmark_output(text)
    assert (result.avg_us, result.count, result.warmup_avg_us) == (79760.9, None, 83235)


def test_a_run_that_failed_before_timing_says_so_and_quotes_the_error():
    text = "INFO: STARTING!\nINFO: Use gpu: [1]\nERROR: Failed to build program executable\n"
    with pytest.raises(BenchmarkOutputError, match="stopped before timing any run.*Failed to build program"):
        parse_benchmark_output(text)


def test_mixed_runs_raise():
    mixed = NEW_CPU_PLAIN + OLD_NO_STATS.split("Average inference")[0]
    mixed += "Inference timings in us: Init: 1, First inference: 2, Warmup (avg): 3, Inference (avg): 2.95034e+06\n"
    with pytest.raises(BenchmarkOutputError, match="disagrees with the last statistics line"):
        parse_benchmark_output(mixed)


def test_non_finite_numbers_raise():
    text = NEW_CPU_PLAIN.replace("avg=2.95034e+06", "avg=nan")
    with pytest.raises(BenchmarkOutputError, match="not finite.*avg=nan"):
        parse_benchmark_output(text)


def test_min_above_max_raises():
    text = OLD_NO_STATS.replace("min=88216 max=129193", "min=129193 max=88216")
    with pytest.raises(BenchmarkOutputError, match="min <= avg <= max"):
        parse_benchmark_output(text)



def test_exported_by_the_profiler_package():
    assert profiler.parse_benchmark_output is parse_benchmark_output
    assert profiler.BenchmarkResult is BenchmarkResult


def test_all_same_short_form_of_several_runs():
    # tensorflow/core/util/stats_calculator.h prints `count=N curr=C(all same)` when every run took C.
    text = "count=3 curr=512(all same)\n\nInference timings in us: Init: 8, First inference: 512, Warmup (avg): 512, Inference (avg): 512\n"
    result = parse_benchmark_output(text)
    assert (result.count, result.avg_us, result.min_us, result.max_us, result.std_us) == (3, 512, 512, 512, 0)
