"""Android phones over ADB: `AdbDevice` measures single-op models with TFLite's `benchmark_model`.

    device      AdbDevice: batches, installation, the device protocol (`open_adb` for the registry)
    connection  connecting with RSA auth, one-line errors, reconnecting with backoff
    wire        adb-shell's private API (fast TCP transport, pipelined sync push), version-guarded
    archive     safe remote names, bounded batches, the batch's ustar archive (tarfile)
    records     the runner's records.txt, parsed into results
    phone       what the phone says of itself (properties, CPU clusters, battery, ABI)
"""
from profiler.adb.device import AdbDevice, open_adb
from profiler.adb.records import RunnerRecord, parse_runner_records, runner_script

__all__ = ["AdbDevice", "RunnerRecord", "open_adb", "parse_runner_records", "runner_script"]
