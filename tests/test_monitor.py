"""The conditions monitor on the host, with a competing process that the tests start and stop.

The machine running the tests may be busy already (CI, a developer's other work, the
issue's competing process on the other core), so every threshold here is relative to the
load measured before the test's own competitor starts.
"""
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from lut.spec import LayerSpec
from lut.table import LatencyTable, Measurement
from profiler.build_lut import CHAIN_OPS, OVERHEAD_REPEATS, build_lut
from profiler.host import HostDevice
from profiler.monitor import ConditionsMonitor, DriftError, HostLoad, MonitorPolicy
from profiler.single_op import SingleOpFactory
from profiler.timing import TimingPolicy

SPECS = [LayerSpec("conv2d", 8, 8, 16, c, activation="relu6") for c in range(8, 129, 8)]
FAST = TimingPolicy(min_runs=5, min_seconds=0.0, max_seconds=0.05)
_BUSY_LOOP = "import time\nend = time.monotonic() + 120\nwhile time.monotonic() < end: pass"


def _competitor() -> subprocess.Popen:
    """Two CPU-bound processes: at least one core's worth even on a loaded 2-core machine."""
    return [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]) for _ in range(2)]


def _stop(processes) -> None:
    for process in processes:
        process.kill()
        process.wait()


def _load_now() -> float:
    """What other processes used over the next second, in cores."""
    load = HostLoad()
    time.sleep(1.0)
    return load.others_cores()


def _background_load() -> float:
    """What other processes use now; the test skips when they leave no room for its competitor."""
    others = _load_now()
    if others > os.cpu_count() - 0.5:
        pytest.skip(f"other processes use {others:.1f} of {os.cpu_count()} cores: no room to start a competitor")
    return others


@pytest.mark.timeout(120)
def test_host_load_sees_a_competing_process():
    before = _background_load()
    processes = _competitor()
    try:
        time.sleep(0.3)
        during = _load_now()  # the competitor may fill the machine: that is what is measured
    finally:
        _stop(processes)
    assert during > before + 0.25, (before, during)
    assert HostLoad().runnable() >= 1


@pytest.mark.timeout(300)
def test_chunks_measured_while_another_process_competes_are_measured_again_once_it_stops(tmp_path):
    device, factory = HostDevice(policy=FAST), SingleOpFactory()
    policy = MonitorPolicy(tolerance_pct=1000.0, busy_cores=_background_load() + 0.25, every=4, wait_s=20.0,
                           poll_s=0.2, max_tries=4)
    processes, messages = [], []

    def log(message: str) -> None:  # the competitor stops once the monitor has said it waits for it
        messages.append(message)
        if "is busy" in message:
            threading.Timer(0.5, _stop, [processes]).start()

    monitor = ConditionsMonitor(device, policy, load=device.load_probe(), log=log)
    processes += _competitor()
    fallback = threading.Timer(60.0, _stop, [processes])  # were it never said
    fallback.start()
    try:
        results = list(monitor.measure((spec.key, factory.build(spec)) for spec in SPECS))
    finally:
        fallback.cancel()
        _stop(processes)
    assert [key for key, _, _ in results] == [spec.key for spec in SPECS]  # every entry once, in order
    assert all(isinstance(r, Measurement) and reference > 0 for _, r, reference in results)
    assert monitor.events and monitor.events[0]["others_cores"] > policy.busy_cores
    assert any("is busy: other processes use" in m for m in messages)
    # the host's chunks last about a quarter of a second, at most `every` entries
    assert any(re.search(r"measuring [1-4] entr(y|ies) again", m) for m in messages)
    summary = monitor.summary()
    assert summary["disturbed"] == len(monitor.events) and summary["checks"] >= len(SPECS) // 4 + summary["disturbed"]


@pytest.mark.timeout(120)
def test_a_quiet_value_is_not_measured_while_another_process_competes(tmp_path):
    device = HostDevice(policy=FAST)
    policy = MonitorPolicy(busy_cores=_background_load() + 0.25, wait_s=0.5, poll_s=0.2)
    processes = _competitor()
    try:
        time.sleep(0.3)
        with pytest.raises(DriftError, match=r"host stayed busy: other processes used .* cores after .* quiet value "
                                             r"cannot be measured now"):
            ConditionsMonitor(device, policy, load=device.load_probe())
    finally:
        _stop(processes)


@pytest.mark.timeout(300)
def test_a_device_that_stays_busy_stops_with_drift_error_and_a_rerun_finishes(tmp_path):
    device = HostDevice(policy=FAST)
    busy = MonitorPolicy(tolerance_pct=1000.0, busy_cores=_background_load() + 0.25, every=4, wait_s=0.5,
                         poll_s=0.2, max_tries=2)
    # Before and after the competitor, other work on a shared machine must not fail the test:
    # what is tested is the busy phase (a DriftError, nothing kept) and that a rerun finishes.
    calm = dataclasses.replace(busy, busy_cores=1000.0)
    path = tmp_path / "lut.sqlite"
    with LatencyTable.create(path, device.conditions()) as table:
        build_lut(device, SPECS[:4], table, progress=False, policy=calm)  # quiet: kept
        assert len(table) == 4
        processes = _competitor()
        try:
            time.sleep(0.3)
            with pytest.raises(DriftError, match=r"host stayed disturbed: .*other processes used .* after 2 tries"):
                build_lut(device, SPECS, table, progress=False, policy=busy)
        finally:
            _stop(processes)
        assert len(table) == 4  # nothing measured while busy was kept, nothing before it was lost
        build_lut(device, SPECS, table, progress=False, policy=calm)
        frame = table.to_dataframe()
    assert len(frame) == len(SPECS) and frame["reference_us"].notna().all()
    # the quiet value is stored (how it is chosen is tested on scripted references below: live
    # references on a shared VM swing by ±15% and cannot be asserted on)
    assert float(LatencyTable.open(path).meta["reference_us"]) > 0


class _ScriptedDevice:
    """A device whose every figure the test scripts: `_us(model_id)`, one call a model measured."""

    name = "scripted"
    monitor_every = 4

    def measure(self, models):
        for model_id, _ in models:
            us = self._us(model_id)
            yield model_id, Measurement(us, us, us, us, 0.0, 10)

    def fingerprint(self):
        return {"device": self.name}


class _ScriptedReference(_ScriptedDevice):
    """A device whose reference model measures the given values in turn (everything else: 10 µs)."""

    monitor_every = 1

    def __init__(self, values):
        self._values = iter(values)

    def _us(self, model_id):
        return next(self._values) if model_id == "reference" else 10.0


def test_fast_bursts_do_not_become_the_quiet_value_but_a_sustained_speed_up_does():
    # recorded on this project's AMD VM (README walk-through, 13:21): one reference at 246.4 µs
    # among 268–283 µs lowered the quiet value to it, and every later chunk measured "+12%" until
    # DriftError. On its Intel VM, with nothing else running, 5% of looks came out at 265–270 µs
    # among 300–320, up to 15% in some 20 s windows: three in a row lowered the quiet value and
    # the build then waited for the next burst.
    start = [309.5, 268.0, 270.1, 311.0, 310.2]
    slow, burst, faster = [310.4, 308.2, 312.9, 306.6] * 5, [268.3, 270.9, 267.5, 269.8], [251.0, 250.2, 252.3, 255.0] * 10
    device = _ScriptedReference(start + slow + burst + slow + faster)
    ticks = itertools.count(0.0, 1.0)  # a look a second
    monitor = ConditionsMonitor(device, MonitorPolicy(tolerance_pct=8.0, max_tries=1), clock=lambda: next(ticks))
    assert monitor.quiet_us == 309.5  # the median of the five: robust to two fast runs
    kept = list(monitor.measure([(f"m{i}", b"") for i in range(44)]))
    assert len(kept) == 44 and not monitor.events
    assert monitor.quiet_us > 305  # a burst of four looks is not a speed-up (half a minute of ~309 µs lowers it a little)
    list(monitor.measure([(f"f{i}", b"") for i in range(40)]))
    assert monitor.quiet_us == pytest.approx(251.0, abs=1.0)  # half a minute of looks at ~251 µs: the device is faster now


def test_a_chunk_is_measured_only_between_two_quiet_references():
    # a stored quiet value (a resumed LUT): the device is looked at before the first chunk.
    # References in turn: slow (the device is let settle), quiet: chunk m0; slow after it: m0
    # again once the reference is quiet; quiet after it: kept.
    device = _ScriptedReference([130.0, 101.0, 125.0, 102.0, 103.0])
    sleeps = []
    monitor = ConditionsMonitor(device, MonitorPolicy(tolerance_pct=8.0, poll_s=0.5, wait_s=30.0), quiet_us=100.0,
                                sleep=sleeps.append)
    kept = list(monitor.measure([("m0", b"")]))
    assert [(key, reference) for key, _, reference in kept] == [("m0", 103.0)]
    assert sleeps == [0.5]  # one look at the slow reference, one poll_s later it was quiet
    assert [e["reference_us"] for e in monitor.events] == [125.0]  # the chunk measured while it slowed
    assert [c.reference_us for c in monitor.checks] == [130.0, 101.0, 125.0, 102.0, 103.0]


def test_a_device_that_never_stays_quiet_through_a_chunk_stops():
    # quiet before every chunk, slow after every one: the flip limit (max_tries × 4 chunks)
    device = _ScriptedReference([100.0, 130.0] * 8)
    monitor = ConditionsMonitor(device, MonitorPolicy(tolerance_pct=8.0, max_tries=2, wait_s=0.0), quiet_us=100.0)
    with pytest.raises(DriftError, match=r"scripted never stayed quiet through a chunk of 1 entry: measured 8 times"):
        list(monitor.measure([("m0", b"")]))
    assert len(monitor.events) == 8


class _PhasedDevice(_ScriptedDevice):
    """A device slow (reference 280 µs, every op 12 µs) for its first `slow_references` looks at
    the reference, then fast (250 µs, 10 µs): a VM whose neighbour went quiet mid-build."""

    name = "phased"

    def __init__(self, slow_references):
        self.slow_references, self.references = slow_references, 0

    def _us(self, model_id):
        fast = self.references >= self.slow_references
        if model_id == "reference":
            self.references += 1
        return (250.0 if fast else 280.0) if model_id == "reference" else (10.0 if fast else 12.0)


@pytest.mark.timeout(120)
def test_the_invocation_overhead_is_measured_through_the_monitor_once_the_quiet_value_has_settled(tmp_path):
    # slow for the quiet value's five looks and two chunks: an overhead measured before the
    # entries, unmonitored (the rule before), came out of the slow phase at 12 µs
    policy = MonitorPolicy(tolerance_pct=8.0, wait_s=0.0, max_tries=2)
    with LatencyTable.create(tmp_path / "lut.sqlite", {"device": "phased"}) as table:
        build_lut(_PhasedDevice(slow_references=7), SPECS, table, progress=False, policy=policy)
        meta = table.meta
    assert float(meta["invoke_overhead_us"]) == 10.0 and float(meta["invoke_overhead_reference_us"]) == 250.0
    # one measured over the tolerance of the quiet value is measured again, with nothing else
    with LatencyTable.open(tmp_path / "lut.sqlite") as table:
        table.set_meta({"invoke_overhead_us": 12.0, "invoke_overhead_reference_us": 280.0})
    with LatencyTable.create(tmp_path / "lut.sqlite", {"device": "phased"}) as table:
        again = build_lut(_PhasedDevice(slow_references=0), SPECS, table, progress=False, policy=policy)
        meta = table.meta
    assert again.measured == 0 and float(meta["invoke_overhead_us"]) == 10.0
    assert float(meta["invoke_overhead_reference_us"]) == 250.0


@pytest.mark.timeout(120)
def test_entries_kept_before_the_quiet_value_came_down_are_measured_again(tmp_path, monkeypatch):
    # five looks make the quiet value (280), then two chunks of 4 entries are kept at 280 µs;
    # from then on the device is fast: three looks at 250 µs lower the quiet value to 250 (this
    # device's looks take no time: the half minute a speed-up must last is taken out), and
    # the 8 entries kept at 280 (+12%, over the 8% tolerance) are measured again, fast
    monkeypatch.setattr("profiler.monitor._CONFIRM_S", 0.0)
    device, messages = _PhasedDevice(slow_references=7), []
    with LatencyTable.create(tmp_path / "lut.sqlite", {"device": "phased", "invoke_overhead_us": 0.4}) as table:
        summary = build_lut(device, SPECS, table, progress=False, log=messages.append,
                            policy=MonitorPolicy(tolerance_pct=8.0, wait_s=0.0, max_tries=2))
        frame = table.to_dataframe()
        assert float(table.meta["reference_us"]) == 250.0
    assert summary.remeasured == 8 and summary.measured == len(SPECS) + 8
    assert (frame["median_us"] == 10.0).all() and (frame["reference_us"] == 250.0).all()
    assert any("measuring again what was kept while the reference ran over 270.0 µs (+8% of its quiet value, "
               "lowered to 250.0 µs since): 8 of 16 entries" in m for m in messages)
    # a rerun finds nothing to measure: every entry is within the tolerance of the quiet value
    with LatencyTable.create(tmp_path / "lut.sqlite", {"device": "phased"}) as table:
        again = build_lut(_PhasedDevice(slow_references=0), SPECS, table, progress=False, log=messages.append)
    assert again.reused == len(SPECS) and again.measured == 0


class _TransientDevice(_ScriptedDevice):
    """A device whose reference never moves (250 µs) and whose ops take 10 µs, but a third of
    them twice that the first time they are measured: a slowdown the reference does not see
    (the Ice Lake VM's 1.3-2.1x entries, each back at its value when measured again)."""

    name = "transient"
    slow = {spec.key for spec in SPECS[::3]}

    def __init__(self):
        self.measured = set()

    def _us(self, model_id):
        first = model_id not in self.measured
        self.measured.add(model_id)
        return 250.0 if model_id == "reference" else 20.0 if first and model_id in self.slow else 10.0


@pytest.mark.timeout(120)
def test_a_slowdown_the_reference_does_not_see_is_kept_out_by_the_second_pass(tmp_path):
    policy = MonitorPolicy(tolerance_pct=8.0, wait_s=0.0, max_tries=2)
    with LatencyTable.create(tmp_path / "two.sqlite", {"device": "transient"}) as table:
        summary = build_lut(_TransientDevice(), SPECS, table, progress=False, policy=policy)
        assert set(table.latencies_us().values()) == {10.0} and not table.unconfirmed(2)
    assert (summary.measured, summary.confirmed, summary.lowered) == (len(SPECS), len(SPECS), 6)
    assert f"{len(SPECS)} measured in a second pass (6 of them lower)" in str(summary)
    # in one pass, the slow third stays; the LUT's rerun gives each entry its second pass, then nothing more
    device = _TransientDevice()
    with LatencyTable.create(tmp_path / "one.sqlite", {"device": "transient"}) as table:
        build_lut(device, SPECS, table, progress=False, policy=policy, passes=1)
        assert sorted(table.latencies_us().values()).count(20.0) == 6 and len(table.unconfirmed(2)) == len(SPECS)
    with LatencyTable.create(tmp_path / "one.sqlite", {"device": "transient"}) as table:
        again = build_lut(device, SPECS, table, progress=False, policy=policy)
        assert set(table.latencies_us().values()) == {10.0}
        done = build_lut(device, SPECS, table, progress=False, policy=policy)
    assert (again.measured, again.confirmed, again.lowered) == (0, len(SPECS), 6)
    assert (done.measured, done.confirmed) == (0, 0)


class _SlowOverheadDevice(_ScriptedDevice):
    """A device whose reference never moves (250 µs) and whose ops take 10 µs, but whose
    trivial models (the invocation overhead's, alone and chained) run 2.5x slower in the passes
    of `OVERHEAD_REPEATS` each numbered in `slow_passes` (from 1): a slowdown the reference does
    not see (the Ice Lake VM under CI's load: an overhead of 1.24 µs against a cheapest entry of 0.60)."""

    name = "slow-overhead"

    def __init__(self, slow_passes):
        self.slow_passes, self.trivial = set(slow_passes), 0

    def _us(self, model_id):
        if model_id == "reference":
            return 250.0
        if not model_id.startswith(("single", "chain")):
            return 10.0
        self.trivial += 1
        us = 9.5 if model_id.startswith("single") else 9.5 + (CHAIN_OPS - 1) * 0.5  # an overhead of 9 µs
        slow = (self.trivial - 1) // (2 * OVERHEAD_REPEATS) + 1 in self.slow_passes
        return us * 2.5 if slow else us


@pytest.mark.timeout(120)
@pytest.mark.parametrize("slow_pass", [1, 2])
def test_the_invocation_overhead_is_the_lowest_of_the_entries_passes_part_by_part(tmp_path, slow_pass):
    policy = MonitorPolicy(tolerance_pct=8.0, wait_s=0.0, max_tries=2)
    with LatencyTable.create(tmp_path / "lut.sqlite", {"device": "slow-overhead"}) as table:
        build_lut(_SlowOverheadDevice([slow_pass]), SPECS, table, progress=False, policy=policy)
        meta = table.meta
    assert float(meta["invoke_overhead_us"]) == pytest.approx(9.0)  # 22.5 in the slow pass
    assert json.loads(meta["invoke_overhead_parts"]) == {"alone_us": pytest.approx(9.5),
                                                         "chain_us": pytest.approx(9.5 + (CHAIN_OPS - 1) * 0.5),
                                                         "passes": 2}
