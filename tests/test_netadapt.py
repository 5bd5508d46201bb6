"""NetAdapt (adapter.search.netadapt) and the proposal trainer (adapter.training.flex) on tiny real models.

Schedule and proposal logic run on a synthetic but plausible LUT (latency grows with the
work of each op, a fixed cost per op), written with `LatencyTable` for every spec the
tiny MobileNets can have on the step-8 grid. On-demand measurement uses the real host.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from adapter.errors import AdapterError
from adapter.latency import Budget, GroupLatency, ensure_estimable, estimate_ms
from adapter.pruning.graph import analyze, find_groups
from adapter.pruning.surgery import channel_counts, filter_norms, prune, prune_to_counts, pruned_weights
from adapter.search import netadapt
from adapter.search.netadapt import NetAdaptConfig
from adapter.search.netadapt import proposals as netadapt_proposals
from adapter.training.flex import FlexTrainer, model_weights, unsupported_layers
from lut.keras_specs import specs_of_keras
from lut.latency import LatencyEstimator
from lut.table import LatencyTable, Measurement
from tests.conftest import LENIENT, LENIENT_FLAGS

REPO = Path(__file__).resolve().parents[1]
FAKE_DEVICE = "fakephone"  # not in any devices.toml: CLIs find the LUT's device unreachable


def synthetic_us(spec) -> float:
    """A plausible latency: 0.5 µs per op plus work (multiply-adds of convolutions, elements of the rest)."""
    h, w = spec.output_hw
    kernel = spec.kernel[0] * spec.kernel[1]
    work = {
        "conv2d": h * w * spec.cin * spec.cout * kernel,
        "depthwise_conv2d": h * w * spec.cin * kernel,
        "fully_connected": spec.cin * spec.cout,
    }.get(spec.op, spec.h * spec.w * spec.cin)
    return 0.5 + work / 2000


def write_synthetic_lut(path, models, *, device=FAKE_DEVICE, step=8, drop=(), dtype="float32", scale=1.0):
    from profiler.plan import plan_specs

    meta = {"device": device, "backend": "cpu", "threads": 1, "delegate": "xnnpack", "flags": "", "step": step,
            "invoke_overhead_us": 0.4, "dtype": dtype}  # the overhead: what a model pays once, not once per op
    with LatencyTable.create(path, meta) as table:
        rows = []
        for spec in plan_specs(models, step, dtype):
            if spec.key not in drop:
                us = scale * synthetic_us(spec)
                rows.append((spec, Measurement(us, us, us, us, 0.0, 1)))
        table.record_many(rows)
    return Path(path)


@pytest.fixture(scope="module")
def v1():
    from lut.models import build_model

    keras.utils.set_random_seed(1)
    return build_model("mobilenet_v1", alpha=0.25, resolution=32, classes=10)


@pytest.fixture(scope="module")
def v2():
    from lut.models import build_model

    keras.utils.set_random_seed(2)
    return build_model("mobilenet_v2", alpha=0.25, resolution=32, classes=10)


@pytest.fixture(scope="module")
def lut_path(tmp_path_factory, v1, v2):
    return write_synthetic_lut(tmp_path_factory.mktemp("lut") / "synthetic.sqlite", [v1, v2])


@pytest.fixture()
def estimator(lut_path):
    table = LatencyTable.open(lut_path)
    yield LatencyEstimator(table)
    table.close()


@pytest.fixture(scope="module")
def small_data():
    """A couple hundred Fashion-MNIST images per split."""
    from adapter.training.sources import load_dataset

    if not Path(os.environ.get("PHONEFIT_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    data = load_dataset("fashion_mnist", resolution=32, holdout=200)
    return dataclasses.replace(data, train=data.train.take(640), test=data.test.take(200))


def _config(budget="0.7", **changes):
    fields = dict(initial_reduction=0.1, decay=1.0, short_term_steps=2, batch_size=32, holdout_size=100,
                  recalibration_images=64, long_term_epochs=0)
    fields.update(changes)
    return NetAdaptConfig(Budget.parse(budget), **fields)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("text, value, relative", [
    ("0.5", 0.5, True), ("50%", 0.5, True), ("12ms", 12.0, False), ("0.8 ms", 0.8, False), ("2e-1", 0.2, True),
])
def test_budget_parses_fractions_percentages_and_milliseconds(text, value, relative):
    budget = Budget.parse(text)
    assert (budget.value, budget.relative) == (pytest.approx(value), relative)
    assert budget.ms(10.0) == pytest.approx(value * 10 if relative else value)


def test_budget_in_lut_terms_is_a_ratio_that_a_disturbed_measurement_cannot_swamp():
    assert Budget(0.5, relative=True).lut_ms(100.0) == 50.0
    # a relative budget ignores the measurement: 60% of the original is 60% of its estimate
    assert Budget(0.6, relative=True).lut_ms(138.4, 249.5) == pytest.approx(0.6 * 138.4)
    # an absolute one is scaled by estimate / measured: 60 ms of a device that runs the
    # original in 90 ms, estimated at 100, is 66.7 in the LUT's terms
    assert Budget(60.0, relative=False).lut_ms(100.0, 90.0) == pytest.approx(60.0 * 100 / 90)
    # the disturbed demo: the additive offset made 0.6 into 28% of the estimate
    additive = 0.6 * 0.2495 - (0.2495 - 0.1384)
    assert additive / 0.1384 == pytest.approx(0.28, abs=0.005)
    assert Budget(0.6, relative=True).lut_ms(0.1384, 0.2495) / 0.1384 == pytest.approx(0.6)


@pytest.mark.parametrize("text", ["half", "1.5", "0", "-0.5", "12 s"])
def test_budget_refuses_what_is_not_a_budget(text):
    with pytest.raises(AdapterError, match="budget"):
        Budget.parse(text)


def test_schedule_reduces_by_decaying_steps_and_saturates_as_the_paper_says():
    paper = NetAdaptConfig(Budget(0.5, relative=True), initial_reduction=0.025, decay=0.96)
    assert paper.max_reduction() == pytest.approx(0.625)
    assert [paper.reduction_ms(i, 100.0) for i in (1, 2, 3)] == pytest.approx([2.5, 2.4, 2.304])
    default = NetAdaptConfig(Budget(0.5, relative=True))
    assert default.max_reduction() == pytest.approx(1.25)
    assert default.iterations_needed(0.5) == 26  # 1.25 · (1 − 0.98²⁶) ≥ 0.5 > 1.25 · (1 − 0.98²⁵)
    assert NetAdaptConfig(Budget(0.5, relative=True), decay=1.0).iterations_needed(0.5) == 20


@pytest.mark.parametrize("changes, match", [
    (dict(decay=0.0), "decay"), (dict(initial_reduction=1.0), "initial_reduction"),
    (dict(short_term_steps=0), "short_term_steps"), (dict(selection="loss"), "selection"), (dict(step=-8), "step"),
])
def test_config_refuses_bad_values_naming_them(changes, match):
    with pytest.raises(AdapterError, match=match):
        NetAdaptConfig(Budget(0.5, relative=True), **changes)


# --------------------------------------------------------------------------- proposals


def test_proposals_are_the_largest_grid_counts_that_meet_the_target(v1, estimator):
    groups = find_groups(v1)
    latency = GroupLatency(v1, groups, estimator, specs_of_keras)
    original = estimate_ms(estimator, v1)
    assert latency.total_ms == pytest.approx(original)
    target = original * 0.97
    proposals = {p.group: p for p in netadapt_proposals._proposals(latency, 8, target)}
    assert proposals, "a 3% cut must be reachable by some group"
    for group in groups:
        def full(count: int, group=group) -> float:
            return estimate_ms(estimator, v1, {name: count for name in group.producers})

        counts = latency.candidates(group.id, 8)
        assert counts == list(range((group.size - 1) // 8 * 8, 0, -8))
        for count in counts:  # the per-group shortcut is exact
            assert latency.total_ms_at(group.id, count) == pytest.approx(full(count), abs=1e-12)
        if group.id in proposals:
            chosen = proposals[group.id].count
            assert full(chosen) <= target and proposals[group.id].estimated_ms == pytest.approx(full(chosen))
            assert all(full(c) > target for c in counts if c > chosen)
        else:
            assert all(full(c) > target for c in counts), f"{group.id} could reach the target but was skipped"


def test_tied_residual_groups_of_mobilenet_v2_are_pruned_together(v2, estimator):
    tied = [g for g in find_groups(v2) if len(g.producers) > 1]
    assert tied, "MobileNetV2 ties each stage's block outputs through its residual adds"
    group = max(tied, key=lambda g: len(g.producers))
    latency = GroupLatency(v2, find_groups(v2), estimator, specs_of_keras)
    count = latency.candidates(group.id, 8)[0]
    keep = netadapt_proposals._kept_channels(v2, group, count)
    expected = np.sort(np.argsort(-filter_norms(v2, group), kind="stable")[:count])
    np.testing.assert_array_equal(keep, expected)
    pruned = prune(v2, {group.id: keep})
    for name in group.producers:
        assert pruned.get_layer(name).get_config()["filters"] == count
    assert channel_counts(pruned)[group.id] == count
    assert latency.total_ms_at(group.id, count) == pytest.approx(estimate_ms(estimator, pruned))
    # Proposals are trained as sliced weights: exactly the weights surgery gives the pruned model.
    sliced = pruned_weights(analyze(v2), model_weights(v2), {group.id: keep})
    for layer_name, weights in model_weights(pruned).items():
        for weight_name, value in weights.items():
            np.testing.assert_array_equal(sliced[layer_name][weight_name], value)


def test_selection_by_accuracy_or_by_accuracy_lost_per_millisecond():
    def result(group, ms, accuracy):
        return netadapt.ProposalResult(netadapt.Proposal(group, 8, ms), accuracy, 0.0, {}, {})

    results = [result("a", 9.0, 0.80), result("b", 8.0, 0.79), result("c", 9.5, 0.80)]
    assert netadapt_proposals._select(results, "accuracy", 0.81, 10.0).proposal.group == "a"  # ties: the faster
    # a loses 0.01 for 1 ms, b 0.02 for 2 ms, c 0.01 for 0.5 ms: a and b tie at −0.01/ms, b is less accurate
    assert netadapt_proposals._select(results, "accuracy_per_latency", 0.81, 10.0).proposal.group == "a"
    results.append(result("d", 7.0, 0.80))
    assert netadapt_proposals._select(results, "accuracy_per_latency", 0.81, 10.0).proposal.group == "d"


# --------------------------------------------------------------------------- the proposal trainer


def test_flex_trainer_trains_pruned_variants_that_load_into_keras_exactly(v2, small_data):
    x, y = small_data.train.take(64).arrays()
    groups = find_groups(v2)
    variant = prune_to_counts(v2, {groups[0].id: 8, groups[-1].id: 16})
    trainer = FlexTrainer(v2)  # traced on the original, trains any pruned variant
    trainer.load(model_weights(variant))
    np.testing.assert_allclose(trainer.predict(x), np.asarray(variant(x, training=False)), atol=1e-5)
    loss_before = float(keras.losses.sparse_categorical_crossentropy(y, trainer.predict(x)).numpy().mean())
    trainer.fit(np.concatenate([x] * 4), np.concatenate([y] * 4), batch_size=32, lr=1e-3)
    trainer.recalibrate(x)
    trained = trainer.weights()
    assert trained[groups[0].producers[0]]["kernel"].shape[-1] == 8
    netadapt_proposals._assign_weights(variant, trained)
    outputs = trainer.predict(x)
    np.testing.assert_allclose(outputs, np.asarray(variant(x, training=False)), atol=1e-5)
    loss_after = float(keras.losses.sparse_categorical_crossentropy(y, outputs).numpy().mean())
    assert loss_after < loss_before


def test_flex_trainer_names_layers_it_cannot_train():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, kernel_regularizer="l2", name="regularized")(inputs)
    x = keras.layers.LayerNormalization(name="norm")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    assert unsupported_layers(model) == [
        "regularized (Conv2D with kernel_regularizer)", "norm (LayerNormalization)"
    ]
    with pytest.raises(AdapterError, match="norm"):
        FlexTrainer(model)


# --------------------------------------------------------------------------- whole runs


def test_run_meets_the_budget_by_estimate_and_records_every_iteration(v1, small_data, estimator, tmp_path):
    config = _config("0.7", initial_reduction=0.1)
    measured = 1.1 * estimate_ms(estimator, v1)  # as if the device measured the original 10% slower
    result = netadapt.run_netadapt(v1, small_data, estimator, config, tmp_path, measured_original_ms=measured,
                                   log=lambda line: None)
    history = netadapt.read_history(tmp_path)
    assert history == list(result.history) and len(history) >= 3
    # a relative budget is a ratio in the LUT's terms too, whatever the device measured
    assert result.budget_ms == pytest.approx(0.7 * result.original_ms)
    assert history[-1].estimated_ms <= result.budget_ms
    assert history[0].estimated_ms == pytest.approx(result.original_ms) and history[0].group == ""
    proposals = (tmp_path / "proposals.csv").read_text().splitlines()[1:]
    for previous, record in zip(history, history[1:]):
        expected_target = max(previous.estimated_ms - 0.1 * result.original_ms, result.budget_ms)
        assert record.target_ms == pytest.approx(expected_target)
        assert record.estimated_ms <= record.target_ms + 1e-12
        assert record.channels == {**previous.channels, record.group: record.count}
        saved = keras.models.load_model(tmp_path / f"iter_{record.iteration:03d}.keras")
        assert channel_counts(saved) == record.channels
        assert estimate_ms(estimator, saved) == pytest.approx(record.estimated_ms)
        rows = [r.split(",") for r in proposals if r.startswith(f"{record.iteration},")]
        assert len(rows) == record.proposals and [r[1] for r in rows if r[-1] == "1"] == [record.group]
        assert 0 <= record.holdout_accuracy <= 1 and record.seconds > 0
    header = (tmp_path / "history.csv").read_text().splitlines()[0]
    assert header.startswith("iteration,group,count,channels,estimated_ms,target_ms,holdout_accuracy,proposals,seconds")
    with pytest.raises(AdapterError, match="--resume"):
        netadapt.run_netadapt(v1, small_data, estimator, config, tmp_path, log=lambda line: None)


def test_a_result_measured_over_the_budget_recalibrates_and_the_search_goes_on(v1, small_data, estimator, tmp_path):
    config = _config("0.7", initial_reduction=0.1)
    original = estimate_ms(estimator, v1)
    measured = []

    def measure(model):  # pruned models run 10% slower than the LUT says, relative to the original
        measured.append(1.1 * estimate_ms(estimator, model) / original)
        return measured[-1]

    result = netadapt.run_netadapt(v1, small_data, estimator, config, tmp_path, measured_original_ms=original,
                                   measure=measure, log=lambda line: None)
    first = result.recalibrations[0]
    assert first["measured_fraction"] == pytest.approx(measured[0]) and first["measured_fraction"] > 0.7 * 1.03
    # multiplicative: the budget in the LUT's terms shrinks by requested / measured
    assert first["budget_ms"] == pytest.approx(0.7 * original * 0.7 / first["measured_fraction"])
    assert result.budget_ms == result.recalibrations[-1]["budget_ms"] < 0.7 * original
    assert measured[-1] <= 0.7 * 1.03 and len(measured) == len(result.recalibrations) + 1
    assert result.history[-1].estimated_ms <= result.budget_ms and result.handed_back is None
    saved = json.loads((tmp_path / netadapt.STATE_FILE).read_text())
    assert saved["budget_ms"] == result.budget_ms and saved["recalibrations"] == list(result.recalibrations)


def test_an_over_pruned_result_hands_back_the_least_pruned_iteration_within_the_budget(v1, small_data, estimator,
                                                                                     tmp_path):
    config = _config("0.7", initial_reduction=0.1)
    original = estimate_ms(estimator, v1)
    checked = []

    def measure(model):  # the device says pruned models are 30% faster than the LUT does
        checked.append(0.7 * estimate_ms(estimator, model) / original)
        return checked[-1]

    result = netadapt.run_netadapt(v1, small_data, estimator, config, tmp_path, measured_original_ms=original,
                                   measure=measure, log=lambda line: None)
    walk = result.handed_back
    assert walk is not None and walk["from_iteration"] == result.history[-1].iteration
    assert walk["from_fraction"] == pytest.approx(checked[0]) and checked[0] < 0.7 * 0.9
    kept = walk["to_iteration"]
    assert 0 < kept < walk["from_iteration"]
    fractions = {c["iteration"]: c["measured_fraction"] for c in walk["checked"]}
    assert fractions[kept] <= 0.7 * 1.03  # the handed-back model meets the budget...
    earlier = kept - 1  # ...and the one before it did not (or was not needed: already within 10%)
    assert earlier not in fractions or fractions[earlier] > 0.7 * 1.03 or fractions[kept] >= 0.7 * 0.9
    assert channel_counts(result.model) == result.history[kept].channels


def test_run_stops_saying_how_far_it_got_when_no_group_reaches_the_target(v1, small_data, estimator, tmp_path):
    config = _config("0.4", initial_reduction=0.5)  # no single group removes half of the latency
    with pytest.raises(AdapterError, match=r"stopped at iteration 1: no channel group can be pruned to the target") as e:
        netadapt.run_netadapt(v1, small_data, estimator, config, tmp_path, log=lambda line: None)
    assert "100.0% of the original" in str(e.value) and "the budget is" in str(e.value)
    assert len(netadapt.read_history(tmp_path)) == 1


@pytest.mark.parametrize("budget, changes, match", [
    ("0.05", {}, "cannot be met: even with every prunable group at 8 channels"),
    ("0.3", dict(initial_reduction=0.025, decay=0.96), "removes at most 62.5%"),
])
def test_unreachable_budgets_are_refused_before_any_training(v1, small_data, estimator, tmp_path, budget, changes, match):
    with pytest.raises(AdapterError, match=match):
        netadapt.run_netadapt(v1, small_data, estimator, _config(budget, **changes), tmp_path, log=lambda line: None)
    assert not (tmp_path / "history.csv").exists()


def test_missing_lut_entries_are_measured_on_the_device_in_one_batch(v1, tmp_path):
    from profiler.host import HostDevice
    from profiler.timing import TimingPolicy

    specs = specs_of_keras(v1)
    dropped = {specs[1].key, specs[-3].key}
    path = write_synthetic_lut(tmp_path / "holes.sqlite", [v1], device="host", drop=dropped)
    estimator = LatencyEstimator(LatencyTable.open(path))
    assert {s.key for s in estimator.missing(specs)} == dropped
    with pytest.raises(AdapterError, match="no device is reachable"):
        ensure_estimable(estimator, specs, None)
    device = HostDevice(threads=1, policy=TimingPolicy(min_runs=5, min_seconds=0.0, max_seconds=0.05))
    lines = []
    assert ensure_estimable(estimator, specs, device, log=lines.append, policy=LENIENT) == 2
    assert estimator.missing(specs) == [] and "measuring 2 layer(s)" in lines[0]
    assert estimator.invoke_overhead_us == 0.4  # estimates made before stay comparable
    for key in dropped:
        measured = estimator.table.lookup(next(s for s in specs if s.key == key))
        assert isinstance(measured, Measurement) and measured.median_us > 0


# --------------------------------------------------------------------------- resume


def small_npz(data, path) -> Path:
    """The splits of `data` as an .npz data set (x_train, y_train, x_test, y_test; holdout in train)."""
    x_train = np.concatenate([data.holdout.images, data.train.images])[..., 0]
    y_train = np.concatenate([data.holdout.labels, data.train.labels])
    np.savez(path, x_train=x_train, y_train=y_train, x_test=data.test.images[..., 0], y_test=data.test.labels)
    return Path(path)


def _adapt_command(model, lut, data, out, *extra):
    return [sys.executable, "-m", "adapter.adapt", "--model", str(model), "--lut", str(lut), "--budget", "0.6",
            "--data", str(data), "--out", str(out), "--initial-reduction", "0.08", "--decay", "1.0", "--short-term-steps", "3",
            "--batch-size", "32", "--holdout", "100", "--long-term-epochs", "0", *LENIENT_FLAGS, *extra]


@pytest.mark.slow
def test_adapt_killed_mid_iteration_resumes_with_the_same_history(v1, lut_path, small_data, tmp_path):
    model_path, data = tmp_path / "tiny.keras", small_npz(small_data, tmp_path / "small.npz")
    v1.save(model_path)
    out = tmp_path / "adapt"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(_adapt_command(model_path, lut_path, data, out), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    history = out / "history.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 3:  # header, iterations 0 and 1
            break
        time.sleep(0.05)
    assert process.poll() is None, "adapt finished or failed before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = history.read_text().splitlines()
    completed = len(before) - 2
    assert completed >= 1
    finished = subprocess.run(_adapt_command(model_path, lut_path, data, out, "--resume"), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"resuming after iteration {completed}" in finished.stdout
    after = history.read_text().splitlines()
    assert after[: len(before)] == before and len(after) > len(before)
    rows = netadapt.read_history(out)
    assert [r.iteration for r in rows] == list(range(len(rows)))
    proposal_iterations = [int(line.split(",")[0]) for line in (out / "proposals.csv").read_text().splitlines()[1:]]
    assert proposal_iterations == sorted(proposal_iterations)  # the interrupted iteration's rows were not kept twice
    assert sum(r.proposals for r in rows) == len(proposal_iterations)
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["met_by_estimate"] and report["adapted"]["estimated_ms"] <= report["budget"]["estimated_ms"]
    assert (out / "adapted.tflite").stat().st_size > 0 and (out / "report.md").is_file()
