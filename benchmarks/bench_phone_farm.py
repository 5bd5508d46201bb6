"""Entries per minute of a LUT built by a group of two phones, next to one phone, in one run.

    python benchmarks/bench_phone_farm.py [--entries 120] [--cooldown 0.5]

The phones are loopback ADB daemons (tests/adb_daemon.py: the real wire protocol over
127.0.0.1, the batch runner under /bin/sh, and a benchmark_model that times each model with
LiteRT). A phone's own time per entry is what the farm divides: the runner's cool-down between
models (`--cooldown`, a phone's default is 1 s) and the stand-in's start (about 0.5 s of this
machine's CPU: two loopback phones share its two cores, which a real farm does not).

The same entries are measured twice, each into a fresh LUT: by phone `a` alone (`build_lut
--device a`), then by the group [a, b] (`build_lut --device pair`: a Ray actor per phone on a
local cluster). Printed: entries per minute while measuring (the build's measuring time, the
reference model after every batch included) and over the whole build (the start: each phone's
reference model, the invocation overhead on the lead phone), their ratio, and the checks the
issue asks for: the same keys as one phone, no duplicate rows, every row naming its phone.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lut.spec import LayerSpec  # noqa: E402
from profiler.adb.connection import ensure_adb_key  # noqa: E402
from profiler.build_lut import build_lut, open_lut  # noqa: E402
from profiler.cluster import ClusterConfig, open_cluster  # noqa: E402
from profiler.device_config import load_device_groups  # noqa: E402
from profiler.devices import open_device  # noqa: E402
from profiler.farm import PhoneFarm  # noqa: E402
from profiler.monitor import MonitorPolicy  # noqa: E402
from tests.adb_daemon import LoopbackAdbDaemon  # noqa: E402
from tests.test_adb_device import loop_entry, write_devices_toml  # noqa: E402

# The benchmark is about throughput: the monitor runs (a reference after every batch) but
# trusts what it sees, since both loopback phones time on this one shared machine.
POLICY = MonitorPolicy(tolerance_pct=1000.0, busy_cores=1000.0, wait_s=0.0)


def _specs(count: int) -> list[LayerSpec]:
    return [LayerSpec("conv2d", 4, 4, 8 * (1 + i // 16), 8 * (1 + i % 16), activation="relu6") for i in range(count)]


def _build(device, specs, path: Path):
    with open_lut(path, device, 8) as table:
        summary = build_lut(device, specs, table, progress=False, policy=POLICY, log=lambda m: None)
        return summary, table.to_dataframe()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=120, help="LUT entries measured each way (default: 120)")
    parser.add_argument("--cooldown", type=float, default=0.5, help="each phone's cool-down between models, s (0.5)")
    parser.add_argument("--batch-size", type=int, default=11, help="a phone's batch: entries and the reference (11)")
    args = parser.parse_args()
    specs = _specs(args.entries)
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        ensure_adb_key(work / "keys" / "adbkey")
        with LoopbackAdbDaemon(work / "pa") as a, LoopbackAdbDaemon(work / "pb") as b:
            phones = {name: loop_entry(work, daemon, batch_size=args.batch_size, cooldown_s=args.cooldown)
                      for name, daemon in (("a", a), ("b", b))}
            devices = str(write_devices_toml(work / "devices.toml", {**phones, "groups": {"pair": {"devices": ["a", "b"]}}}))
            one = open_device("a", threads=1, devices_file=devices)
            try:
                single, single_rows = _build(one, specs, work / "one.sqlite")
            finally:
                one.close()
            with open_cluster(ClusterConfig(workers=1)):
                with PhoneFarm("pair", load_device_groups(devices)["pair"], threads=1, devices_file=devices,
                               policy=POLICY, log=lambda m: None) as farm:
                    group, group_rows = _build(farm, specs, work / "farm.sqlite")
                    rates = farm.rates()
    one_rate, farm_rate = 60 * single.measured / single.measure_s, 60 * group.measured / group.measure_s
    one_whole, farm_whole = 60 * single.measured / single.total_s, 60 * group.measured / group.total_s
    print(f"{args.entries} entries, batches of {args.batch_size - 1} and the reference, cool-down {args.cooldown:g} s")
    print(f"one phone (a):          {one_rate:6.1f} entries/min measuring, {one_whole:6.1f} over the whole build "
          f"({single.total_s:.0f} s)")
    print(f"group of two (a, b):    {farm_rate:6.1f} entries/min measuring, {farm_whole:6.1f} over the whole build "
          f"({group.total_s:.0f} s); per phone: " + ", ".join(f"{n} {r:.1f}" for n, r in rates.items()))
    print(f"ratio (group / one):    {farm_rate / one_rate:.2f}x measuring, {farm_whole / one_whole:.2f}x whole build")
    same_keys = set(group_rows["key"]) == set(single_rows["key"]) == {s.key for s in specs}
    print(f"same keys as one phone: {same_keys}; duplicate rows: {int(group_rows['key'].duplicated().sum())}; "
          f"rows by phone: {group_rows['measured_by'].value_counts().to_dict()}; rows naming no phone: "
          f"{int(group_rows['measured_by'].isna().sum())}")
    return 0 if same_keys else 1


if __name__ == "__main__":
    sys.exit(main())
