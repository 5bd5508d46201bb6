"""A phone farm (profiler.farm): a devices.toml group of loopback phones builds one LUT, each
phone driven by a Ray actor of a real local cluster, speaking the real ADB protocol.

Live timings on a shared machine are noisy, so where a test is not about the references the
monitor trusts what it sees (tolerance 1000%); the 20%-off phone is judged at 10%, with its
slow-down (×1.35) injected by the loopback phone, well clear of a busy host's noise.
"""
from __future__ import annotations

import threading
import time

import pytest

from lut.spec import LayerSpec
from lut.table import LatencyTable
from profiler.adb.connection import ensure_adb_key
from profiler.build_lut import build_lut, open_lut
from profiler.cluster import ClusterConfig, open_cluster
from profiler.device_config import load_device_groups
from profiler.devices import open_device
from profiler.errors import ProfilerError
from profiler.farm import PhoneFarm, group_reference
from profiler.monitor import MonitorPolicy
from tests.adb_daemon import Faults, LoopbackAdbDaemon
from tests.test_adb_device import loop_entry, write_devices_toml

SPECS = [LayerSpec("conv2d", 4, 4, 8, c, activation="relu6") for c in range(8, 8 * 13, 8)]  # 12 entries
LENIENT = MonitorPolicy(tolerance_pct=1000.0, wait_s=0.0)


@pytest.fixture(scope="module")
def ray_cluster():
    with open_cluster(ClusterConfig(workers=1, threads_per_worker=2)):
        yield


def _devices(tmp_path, daemons, **overrides) -> str:
    """devices.toml with phones a, b, … (batches of 3 entries and the reference) and the group `pair`."""
    ensure_adb_key(tmp_path / "keys" / "adbkey")  # made once, before the actors read it
    names = [chr(ord("a") + i) for i in range(len(daemons))]
    entries = {name: loop_entry(tmp_path, daemon, **{"batch_size": 4, "reconnect_tries": 1, "drift_pause_s": 2.0,
                                                      **overrides.get(name, {})})
               for name, daemon in zip(names, daemons)}
    path = write_devices_toml(tmp_path / "devices.toml", {**entries, "groups": {"pair": {"devices": names}}})
    return str(path)


def _build(tmp_path, devices: str, policy: MonitorPolicy = LENIENT, messages: list[str] | None = None, passes: int = 1):
    """One pass unless asked: these tests count what each phone measured (the second pass is
    build_lut's, the same for a farm as for one device: tests/test_monitor.py)."""
    log = (messages if messages is not None else []).append
    farm = PhoneFarm("pair", load_device_groups(devices)["pair"], threads=1, devices_file=devices, policy=policy, log=log)
    with farm, open_lut(tmp_path / "farm.sqlite", farm, 8) as table:
        summary = build_lut(farm, SPECS, table, progress=False, policy=policy, log=log, passes=passes)
        rows = table.to_dataframe()
        meta = table.meta
    return farm, summary, rows, meta


def test_the_groups_reference_is_the_one_most_phones_agree_with():
    assert group_reference({"a": 100.0, "b": 120.0}, 10.0) == (100.0, ["b"])  # a tie: the faster
    assert group_reference({"a": 80.0, "b": 100.0, "c": 103.0}, 10.0) == (100.0, ["a"])  # faster, but alone
    assert group_reference({"a": 100.0, "b": 104.0}, 10.0) == (100.0, [])


def test_a_group_needs_known_phones_and_a_name_of_its_own(tmp_path):
    entry = {"address": "10.0.0.2:5555", "benchmark_model": "bm"}
    ok = write_devices_toml(tmp_path / "ok.toml", {"a": entry, "b": entry, "groups": {"pair": {"devices": ["a", "b"]}}})
    assert load_device_groups(ok) == {"pair": ("a", "b")}
    for groups, message in (({"pair": {"devices": ["a", "z"]}}, r"'z' is not a phone"),
                            ({"a": {"devices": ["a", "b"]}}, r"is no phone's name"),
                            ({"pair": {"devices": ["a", "a"]}}, r"distinct phone names"),
                            ({"pair": {"phones": ["a"]}}, r"must hold one setting")):
        path = write_devices_toml(tmp_path / "bad.toml", {"a": entry, "b": entry, "groups": groups})
        with pytest.raises(ProfilerError, match=message):
            load_device_groups(path)


@pytest.mark.timeout(600)
def test_two_phones_build_the_lut_one_phone_builds_every_row_naming_its_phone(tmp_path, ray_cluster):
    with LoopbackAdbDaemon(tmp_path / "pa") as a, LoopbackAdbDaemon(tmp_path / "pb") as b:
        devices = _devices(tmp_path, [a, b])
        farm, summary, rows, meta = _build(tmp_path, devices, passes=2)
        # one phone alone, as `build_lut --device a` measures it
        single = open_device("a", threads=1, devices_file=devices)
        try:
            with LatencyTable.create(tmp_path / "one.sqlite", single.conditions()) as table:
                build_lut(single, SPECS, table, progress=False, policy=LENIENT)
                one = table.to_dataframe()
        finally:
            single.close()
    assert set(rows["key"]) == set(one["key"]) == {spec.key for spec in SPECS}
    assert len(rows) == len(SPECS) and summary.measured == summary.confirmed == len(SPECS)  # every entry once a pass
    assert (rows["passes"] == 2).all()
    assert set(rows["measured_by"]) == {"a", "b"}  # both phones worked, and each row says which
    assert set(one["measured_by"]) == {"a"}
    assert (rows["status"] == "ok").all() and rows["reference_us"].notna().all()
    import json

    fingerprint = json.loads(meta["fingerprint"])
    assert fingerprint["group"] == "pair" and set(fingerprint["phones"]) == {"a", "b"}
    assert all(p["reference_us"] > 0 and p["taken_out"] is None for p in fingerprint["phones"].values())
    assert sum(p["entries"] for p in fingerprint["phones"].values()) == 2 * len(SPECS)  # both passes
    assert json.loads(meta["monitor"])["checks"] >= len(SPECS) // 3
    assert meta["device"] == "pair"


@pytest.mark.timeout(600)
def test_a_phone_that_drops_out_mid_batch_loses_nothing(tmp_path, ray_cluster):
    with LoopbackAdbDaemon(tmp_path / "pa") as a, LoopbackAdbDaemon(tmp_path / "pb") as b:
        devices = _devices(tmp_path, [a, b])
        start_runs = 5 + 1  # the reference's quiet value, and the look before the first batch

        def unplug_b() -> None:  # the cable goes halfway through b's second batch
            while b.models_run < start_runs + 4 + 2:
                time.sleep(0.01)
            b.close()

        threading.Thread(target=unplug_b, daemon=True).start()
        messages: list[str] = []
        farm, summary, rows, _ = _build(tmp_path, devices, messages=messages)
    assert set(rows["key"]) == {spec.key for spec in SPECS} and len(rows) == len(SPECS)
    assert farm.phones == ["a"]
    assert any("b taken out:" in m and "its batch of 3 entries goes to the others" in m for m in messages)
    by_b = int((rows["measured_by"] == "b").sum())
    assert by_b == 3  # its first batch, finished before the cable went; the second went to a
    assert int((rows["measured_by"] == "a").sum()) == len(SPECS) - by_b


@pytest.mark.timeout(600)
def test_a_phone_whose_reference_is_off_the_groups_by_20_percent_is_taken_out_and_its_entries_measured_again(
        tmp_path, ray_cluster):
    # Both phones report steady timings (the host's noise on this VM moves a loopback reference
    # by up to 30%, which is not what is tested). b slows down by 20% after its first batch, as a
    # throttled phone does: that batch's reference and every look after it are 20% off the
    # group's, past the 10% tolerance, so its monitor gives up and its batch goes to a.
    slow_from = 5 + 1 + 4  # quiet value, the look before the first batch, that batch and its reference
    steady = Faults(steady_us=200.0)
    with (LoopbackAdbDaemon(tmp_path / "pa", faults=steady) as a,
          LoopbackAdbDaemon(tmp_path / "pb", faults=Faults(steady_us=200.0, slow_runs=(slow_from, 10**6),
                                                           slow_factor=1.2)) as b):
        devices = _devices(tmp_path, [a, b], b={"drift_max_pauses": 1, "drift_pause_s": 1.0})
        messages: list[str] = []
        policy = MonitorPolicy(tolerance_pct=10.0, busy_cores=1000.0)
        farm, summary, rows, meta = _build(tmp_path, devices, policy=policy, messages=messages)
    assert set(rows["key"]) == {spec.key for spec in SPECS} and len(rows) == len(SPECS)
    assert farm.phones == ["a"]
    assert any("b taken out: b stayed disturbed: reference 240.0 µs (+20.0% of its quiet 200.0 µs)" in m
               and "goes to the others" in m for m in messages), messages
    assert int((rows["measured_by"] == "b").sum()) == 3, messages  # the batch it measured before it slowed stays
    assert set(rows["reference_us"]) == {200.0} and float(meta["reference_us"]) == 200.0


@pytest.mark.timeout(600)
def test_a_phone_off_the_group_from_the_start_measures_nothing(tmp_path, ray_cluster):
    with (LoopbackAdbDaemon(tmp_path / "pa", faults=Faults(steady_us=200.0)) as a,
          LoopbackAdbDaemon(tmp_path / "pb", faults=Faults(steady_us=200.0, slow_runs=(0, 10**6), slow_factor=1.2)) as b):
        devices = _devices(tmp_path, [a, b])
        messages: list[str] = []
        farm, summary, rows, meta = _build(tmp_path, devices, policy=MonitorPolicy(tolerance_pct=10.0), messages=messages)
    assert set(rows["measured_by"]) == {"a"} and len(rows) == len(SPECS)
    assert any("b taken out: its reference model measures 240.0 µs, +20.0% of the group's 200.0 µs" in m
               for m in messages), messages
    assert b.models_run == 5  # its reference, and nothing else


@pytest.mark.timeout(300)
def test_a_group_whose_phones_are_all_unreachable_exits_2_in_one_line(tmp_path, capsys):
    from profiler.build_lut import main

    with LoopbackAdbDaemon(tmp_path / "pa") as a, LoopbackAdbDaemon(tmp_path / "pb") as b:
        devices = _devices(tmp_path, [a, b], a={"connect_timeout_s": 0.5}, b={"connect_timeout_s": 0.5})
    # both daemons are gone: nothing listens on their ports
    code = main(["--device", "pair", "--devices", devices, "--model", "mobilenet_v1", "--alpha", "0.25",
                 "--resolution", "32", "--classes", "10", "--step", "64", "--out", str(tmp_path / "lut.sqlite"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("python -m profiler.build_lut: error: No phone of the group 'pair' is left: a could not "
                              "be opened: "), err
    assert "b could not be opened: " in err[-1] and "wireless debugging is on" in err[-1]


@pytest.mark.timeout(300)
def test_a_group_named_as_one_device_is_its_first_reachable_phone(tmp_path):
    with LoopbackAdbDaemon(tmp_path / "pb") as b:
        with LoopbackAdbDaemon(tmp_path / "pa") as a:
            devices = _devices(tmp_path, [a, b], a={"connect_timeout_s": 0.5})
        # a is gone: b measures for the group, under the group's name (a LUT the group built is its)
        device = open_device("pair", threads=1, devices_file=devices)
        try:
            assert device.name == "b" and device.conditions()["device"] == "pair"
        finally:
            device.close()
