"""The loopback ADB daemon, checked by two independent clients (adb-shell and Debian's
`adb`) and by a raw client for the wire details, and the `benchmark_model` stand-in."""
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from adb_shell.adb_device import AdbDeviceTcp
from adb_shell.auth.keygen import keygen
from adb_shell.auth.sign_pythonrsa import PythonRSASigner
from adb_shell.exceptions import (
    AdbCommandFailureException,
    DeviceAuthError,
    PushFailedError,
    TcpTimeoutException,
)

from tests.adb_daemon import CPU_CLUSTERS, Faults, LoopbackAdbDaemon, parse_adb_public_key

FAKE_BENCHMARK = Path(__file__).with_name("fake_benchmark_model.py")
REMOTE_DIR = "/data/local/tmp/phonefit"
# Flags that keep one stand-in run short.
QUICK = "--num_threads=1 --warmup_runs=2 --warmup_min_secs=0 --num_runs=20 --min_secs=0"
STATS_RE = re.compile(
    r"count=(\d+) first=(\d+) curr=(\d+) min=(\d+) max=(\d+) avg=([\d.e+]+) std=(\d+) p5=(\d+) median=(\d+) p95=(\d+)"
)
SUMMARY_RE = re.compile(
    r"Inference timings in us: Init: (\d+), First inference: (\d+), Warmup \(avg\): ([\d.e+]+), Inference \(avg\): ([\d.e+]+)"
)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adb_key(tmp_path_factory):
    """(signer, public key line) of a fresh adb RSA key, made by adb-shell's keygen."""
    path = tmp_path_factory.mktemp("adbkey") / "adbkey"
    keygen(str(path))
    return PythonRSASigner.FromRSAKeyPath(str(path)), Path(f"{path}.pub").read_text()


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory) -> Path:
    """A one-convolution .tflite model (16x16x8 -> 16 filters)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((16, 16, 8), batch_size=1), keras.layers.Conv2D(16, 3, padding="same")])
    path = tmp_path_factory.mktemp("models") / "conv.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def connect(daemon, signer=None, **kwargs) -> AdbDeviceTcp:
    device = AdbDeviceTcp(daemon.host, daemon.port, default_transport_timeout_s=10)
    device.connect(rsa_keys=[signer] if signer else None, auth_timeout_s=kwargs.pop("auth_timeout_s", 5), **kwargs)
    return device


@pytest.fixture
def daemon(tmp_path, adb_key):
    with LoopbackAdbDaemon(tmp_path / "device", authorized_keys=[adb_key[1]]) as running:
        yield running


@pytest.fixture
def device(daemon, adb_key):
    connected = connect(daemon, adb_key[0])
    yield connected
    connected.close()


def push_benchmark(device, models: dict[str, Path]) -> None:
    device.push(str(FAKE_BENCHMARK), f"{REMOTE_DIR}/benchmark_model", st_mode=stat.S_IFREG | 0o755)
    for name, path in models.items():
        device.push(str(path), f"{REMOTE_DIR}/{name}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- authentication


def test_preauthorized_key_connects_and_runs_shell_commands(daemon, adb_key):
    device = connect(daemon, adb_key[0])
    assert device.available
    assert device.shell("echo hi; echo err >&2") == "hi\nerr\n"  # v1 shell: stderr merged
    assert daemon.connections == 1


def test_unknown_key_is_accepted_through_rsapublickey_and_remembered(tmp_path, adb_key):
    sent_public_key = []
    with LoopbackAdbDaemon(tmp_path / "device", auth="accept") as running:
        first = connect(running, adb_key[0], auth_callback=sent_public_key.append)
        assert first.shell("echo first") == "first\n"
        second = connect(running, adb_key[0], auth_callback=sent_public_key.append)
        assert second.shell("echo second") == "second\n"
    assert len(sent_public_key) == 1  # the second connection's signature was enough


def test_reject_mode_never_answers_the_public_key(tmp_path, adb_key):
    with LoopbackAdbDaemon(tmp_path / "device", auth="reject") as running:
        started = time.monotonic()
        with pytest.raises(TcpTimeoutException):
            connect(running, adb_key[0], auth_timeout_s=0.5)
        assert time.monotonic() - started < 5
        with pytest.raises(DeviceAuthError):
            connect(running)  # no key at all


def test_none_mode_needs_no_key(tmp_path):
    with LoopbackAdbDaemon(tmp_path / "device", auth="none") as running:
        assert connect(running).shell("echo open") == "open\n"


def test_public_key_parser_reads_adb_key_files(adb_key):
    signer, public_line = adb_key
    key = parse_adb_public_key(public_line)
    assert key.modulus == signer.priv_key.n and key.exponent == signer.priv_key.e == 65537
    with pytest.raises(ValueError, match="524 bytes"):
        parse_adb_public_key("QUJD user@host")


# ----------------------------------------------------------------------------- sync


def test_multi_megabyte_push_and_pull_are_intact(daemon, device, tmp_path):
    original = tmp_path / "big.bin"
    original.write_bytes(os.urandom(6 * 1024 * 1024 + 123))
    device.push(str(original), f"{REMOTE_DIR}/deep/big.bin")
    on_device = daemon.root / "phonefit" / "deep" / "big.bin"
    assert sha256(on_device) == sha256(original)
    back = tmp_path / "back.bin"
    device.pull(f"{REMOTE_DIR}/deep/big.bin", str(back))
    assert back.stat().st_size == 6 * 1024 * 1024 + 123
    assert sha256(back) == sha256(original)


def test_push_keeps_the_mode_and_mtime(daemon, device, tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho ran $1\n")
    device.push(str(script), f"{REMOTE_DIR}/run.sh", st_mode=stat.S_IFREG | 0o755, mtime=1_700_000_000)
    device.push(str(script), f"{REMOTE_DIR}/data.txt", st_mode=stat.S_IFREG | 0o640)
    info = (daemon.root / "phonefit" / "run.sh").stat()
    assert stat.S_IMODE(info.st_mode) == 0o755 and info.st_mtime == 1_700_000_000
    assert stat.S_IMODE((daemon.root / "phonefit" / "data.txt").stat().st_mode) == 0o640
    assert device.shell(f"{REMOTE_DIR}/run.sh ok") == "ran ok\n"


def test_push_over_a_file_replaces_it_as_adbd_does(daemon, device, tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"first version, the longer one")
    device.push(str(source), f"{REMOTE_DIR}/model.bin")
    on_device = daemon.root / "phonefit" / "model.bin"
    reader = on_device.open("rb")  # e.g. a benchmark still holding the old model
    first_inode = on_device.stat().st_ino
    source.write_bytes(b"second")
    device.push(str(source), f"{REMOTE_DIR}/model.bin")
    assert on_device.read_bytes() == b"second" and on_device.stat().st_ino != first_inode  # a new file
    assert reader.read() == b"first version, the longer one"  # the old one, untouched
    reader.close()


def test_stat_and_list_describe_remote_files(daemon, device):
    (daemon.root / "phonefit").mkdir()
    (daemon.root / "phonefit" / "a.tflite").write_bytes(b"x" * 1234)
    os.utime(daemon.root / "phonefit" / "a.tflite", (1_600_000_000, 1_600_000_000))
    mode, size, mtime = device.stat(f"{REMOTE_DIR}/a.tflite")
    assert stat.S_ISREG(mode) and size == 1234 and mtime == 1_600_000_000
    assert stat.S_ISDIR(device.stat(REMOTE_DIR)[0])
    assert device.stat(f"{REMOTE_DIR}/missing") == (0, 0, 0)  # what adbd answers for a missing path
    entries = {bytes(f.filename).decode(): f for f in device.list(REMOTE_DIR)}
    assert set(entries) == {".", "..", "a.tflite"}
    assert entries["a.tflite"].size == 1234


def test_sync_outside_the_remote_root_is_refused(daemon, device, tmp_path):
    local = tmp_path / "f"
    local.write_text("x")
    (daemon.root / "escape").symlink_to("/etc")
    with pytest.raises(PushFailedError, match="outside /data/local/tmp"):
        device.push(str(local), "/etc/phonefit-should-not-exist")
    assert not Path("/etc/phonefit-should-not-exist").exists()
    for path in ("/etc/passwd", "/data/local/tmp/../../../etc/passwd", "/data/local/tmp/escape/passwd"):
        with pytest.raises(AdbCommandFailureException, match="Permission denied"):
            device.pull(path, str(tmp_path / "stolen"))
    assert device.stat("/etc/passwd") == (0, 0, 0)
    assert device.list("/etc") == []
    assert device.shell("echo still usable") == "still usable\n"  # a refusal does not end anything


# ----------------------------------------------------------------------------- shell


def test_shell_runs_in_the_remote_root_and_shows_device_paths(daemon, device):
    assert device.shell("pwd") == "/data/local/tmp\n"
    device.shell(f"mkdir -p {REMOTE_DIR} && echo 42 > {REMOTE_DIR}/answer.txt")
    assert (daemon.root / "phonefit" / "answer.txt").read_text() == "42\n"
    assert device.shell(f"cd {REMOTE_DIR} && pwd && ls") == f"{REMOTE_DIR}\nanswer.txt\n"
    error = device.shell(f"cat {REMOTE_DIR}/missing.txt")
    assert f"{REMOTE_DIR}/missing.txt" in error and str(daemon.root) not in error


def test_device_stand_ins_answer_the_fingerprint_commands(tmp_path):
    props = {"ro.product.model": "Test Phone 9", "ro.soc.model": "SM8650"}
    with LoopbackAdbDaemon(tmp_path / "device", auth="none", props=props) as running:
        device = connect(running)
        answers = device.shell(
            "getprop ro.product.model; getprop ro.soc.model; getprop ro.board.platform;"
            " getprop ro.build.version.release; getprop ro.product.cpu.abi; getprop no.such.prop fallback"
        )
        assert answers.splitlines() == ["Test Phone 9", "SM8650", "gs201", "14", "arm64-v8a", "fallback"]
        assert "[ro.product.model]: [Test Phone 9]" in device.shell("getprop").splitlines()
        assert re.search(r"^  temperature: 312$", device.shell("dumpsys battery"), re.MULTILINE)
        max_freqs = device.shell("cat /sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq").split()
        assert max_freqs == [str(khz) for _, cpus, khz in CPU_CLUSTERS for _ in cpus]
        governors = device.shell("cat /sys/devices/system/cpu/cpufreq/policy*/scaling_governor").split()
        assert governors == ["schedutil"] * 3
        assert device.shell("ls -d /sys/devices/system/cpu/cpu[0-9]*").split()[-1] == "/sys/devices/system/cpu/cpu7"


def test_connections_are_served_concurrently(daemon, adb_key):
    devices = [connect(daemon, adb_key[0]) for _ in range(3)]
    outputs = {}

    def run(index):
        outputs[index] = devices[index].shell(f"sleep 1; echo {index}")

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outputs == {0: "0\n", 1: "1\n", 2: "2\n"}
    assert time.monotonic() - started < 2.95  # three 1 s commands overlapped (in turn: 3 s or more)
    assert daemon.connections == 3


# ----------------------------------------------------------------------------- the wire, by hand


class RawClient:
    """Just enough of the host side to check the daemon's packets byte by byte."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def send(self, command: bytes, arg0: int, arg1: int, data: bytes = b"", *, magic=None) -> None:
        code = int.from_bytes(command, "little")
        magic = code ^ 0xFFFFFFFF if magic is None else magic
        self.sock.sendall(struct.pack("<6I", code, arg0, arg1, len(data), sum(data), magic) + data)

    def receive(self, timeout: float = 5) -> tuple[bytes, int, int, bytes, int]:
        self.sock.settimeout(timeout)
        header = self._exact(24)
        code, arg0, arg1, length, check, magic = struct.unpack("<6I", header)
        assert magic == code ^ 0xFFFFFFFF
        return code.to_bytes(4, "little"), arg0, arg1, self._exact(length), check

    def silent_for(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""  # b"": closed, also no message
        except TimeoutError:
            return True

    def _exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data


@pytest.fixture
def open_daemon(tmp_path):
    with LoopbackAdbDaemon(tmp_path / "device", auth="none") as running:
        yield running


def test_version_negotiation_decides_checksums_and_payload_size(open_daemon):
    legacy = RawClient(open_daemon.port)
    legacy.send(b"CNXN", 0x01000000, 256 * 1024, b"host::\0")
    command, version, max_data, banner, check = legacy.receive()
    assert (command, version, max_data) == (b"CNXN", 0x01000001, 256 * 1024)
    assert banner.startswith(b"device::ro.product.name=panther;ro.product.model=Pixel 7;") and b"shell_v2" not in banner
    assert check == sum(banner)  # version 0x01000000: the byte sum is sent
    modern = RawClient(open_daemon.port)
    modern.send(b"CNXN", 0x01000001, 4096, b"host::features=shell_v2\0")
    command, version, max_data, banner, check = modern.receive()
    assert (command, version, max_data, check) == (b"CNXN", 0x01000001, 4096, 0)
    modern.send(b"OPEN", 7, 0, b"shell:echo hello\0")
    assert modern.receive()[:3] == (b"OKAY", 1, 7)
    command, local, remote, data, check = modern.receive()
    assert (command, local, remote, data, check) == (b"WRTE", 1, 7, b"hello\n", 0)  # 0x01000001: no sum


def test_one_unacknowledged_write_per_stream(open_daemon):
    client = RawClient(open_daemon.port)
    client.send(b"CNXN", 0x01000001, 4096, b"host::\0")
    assert client.receive()[0] == b"CNXN"
    client.send(b"OPEN", 3, 0, b"exec:head -c 20000 /dev/zero\0")
    okay, local_id, remote_id, _, _ = client.receive()
    assert (okay, remote_id) == (b"OKAY", 3)
    received = []
    while True:
        command, arg0, arg1, data, _ = client.receive()
        if command == b"CLSE":
            break
        assert (command, arg0, arg1) == (b"WRTE", local_id, 3) and len(data) <= 4096
        received.append(data)
        if len(received) == 1:
            assert client.silent_for(0.3)  # nothing more until we acknowledge
        client.send(b"OKAY", 3, local_id)
    assert b"".join(received) == bytes(20000) and len(received) >= 5


def test_streams_on_one_connection_run_concurrently(open_daemon):
    client = RawClient(open_daemon.port)
    client.send(b"CNXN", 0x01000001, 4096, b"host::\0")
    client.receive()
    started = time.monotonic()
    for remote_id in (11, 12, 13):
        client.send(b"OPEN", remote_id, 0, f"shell:sleep 1; echo stream {remote_id}\0".encode())
    output, closed, local_ids = {}, set(), {}
    while len(closed) < 3:
        command, local_id, remote_id, data, _ = client.receive()
        if command == b"OKAY":
            local_ids[remote_id] = local_id
        elif command == b"WRTE":
            output[remote_id] = output.get(remote_id, b"") + data
            client.send(b"OKAY", remote_id, local_id)
        elif command == b"CLSE":
            closed.add(remote_id)
            client.send(b"CLSE", remote_id, local_id)
    assert output == {n: f"stream {n}\n".encode() for n in (11, 12, 13)}
    assert sorted(local_ids.values()) == [1, 2, 3]
    assert time.monotonic() - started < 2.95  # the three streams overlapped (in turn: 3 s or more)


def test_bad_packets_and_unknown_services(open_daemon, tmp_path):
    client = RawClient(open_daemon.port)
    client.send(b"CNXN", 0x01000001, 4096, b"host::\0")
    client.receive()
    client.send(b"OPEN", 5, 0, b"reverse:forward:tcp:1\0")
    assert client.receive()[:3] == (b"CLSE", 0, 5)  # unknown service: refused, connection kept
    client.send(b"OPEN", 6, 0, b"shell:echo fine\0")
    assert client.receive()[0] == b"OKAY"
    client.send(b"OKAY", 6, 1, magic=0x12345678)  # bad magic ends the connection
    with pytest.raises(ConnectionError):
        while True:
            client.receive()
    wrong_sum = RawClient(open_daemon.port)
    code = int.from_bytes(b"CNXN", "little")
    wrong_sum.sock.sendall(struct.pack("<6I", code, 0x01000000, 4096, 7, 1, code ^ 0xFFFFFFFF) + b"host::\0")
    with pytest.raises(ConnectionError):
        wrong_sum.receive()


def test_a_wrong_signature_gets_a_fresh_token(tmp_path, adb_key):
    with LoopbackAdbDaemon(tmp_path / "device", auth="accept", authorized_keys=[adb_key[1]]) as running:
        client = RawClient(running.port)
        client.send(b"CNXN", 0x01000001, 4096, b"host::\0")
        command, kind, _, token, _ = client.receive()
        assert (command, kind, len(token)) == (b"AUTH", 1, 20)
        client.send(b"AUTH", 2, 0, bytes(256))
        command, kind, _, fresh, _ = client.receive()
        assert (command, kind, len(fresh)) == (b"AUTH", 1, 20) and fresh != token
        client.send(b"AUTH", 2, 0, adb_key[0].Sign(fresh))
        assert client.receive()[0] == b"CNXN"


# ----------------------------------------------------------------------------- Debian's adb


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("adb") is None, reason="Debian's adb client is not installed (apt-get install adb)")
def test_debian_adb_client_connects_shells_pushes_and_pulls(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANDROID_") and k != "ADB_VENDOR_KEYS"}
    env.update(HOME=str(home), ANDROID_ADB_SERVER_PORT=str(free_port()))

    def adb(*args, timeout=30):
        return subprocess.run(
            ["adb", *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    try:
        assert adb("start-server").returncode == 0  # makes ~/.android/adbkey in our HOME
        public_key = (home / ".android" / "adbkey.pub").read_text()
        with LoopbackAdbDaemon(tmp_path / "device", auth="reject", authorized_keys=[public_key]) as running:
            serial = running.serial
            assert f"connected to {serial}" in adb("connect", serial).stdout
            assert adb("-s", serial, "wait-for-device", timeout=20).returncode == 0
            shell = adb("-s", serial, "shell", "echo hi; getprop ro.product.model")
            assert shell.stdout == "hi\nPixel 7\n"
            original = tmp_path / "payload.bin"
            original.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
            original.chmod(0o755)
            pushed = adb("-s", serial, "push", str(original), f"{REMOTE_DIR}/payload.bin")
            assert pushed.returncode == 0, pushed.stderr
            on_device = running.root / "phonefit" / "payload.bin"
            assert sha256(on_device) == sha256(original) and stat.S_IMODE(on_device.stat().st_mode) == 0o755
            back = tmp_path / "back.bin"
            pulled = adb("-s", serial, "pull", f"{REMOTE_DIR}/payload.bin", str(back))
            assert pulled.returncode == 0, pulled.stderr
            assert sha256(back) == sha256(original)
            assert adb("-s", serial, "shell", f"ls {REMOTE_DIR}").stdout == "payload.bin\n"
    finally:
        adb("kill-server")


# ----------------------------------------------------------------------------- benchmark_model stand-in


def run_fake(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PHONEFIT_FAKE_BENCHMARK", None)
    return subprocess.run([str(FAKE_BENCHMARK), *args], env=env, capture_output=True, text=True, timeout=120)


def test_fake_benchmark_prints_benchmark_model_timings(tiny_tflite):
    result = run_fake(f"--graph={tiny_tflite}", *QUICK.split(), "--use_xnnpack=true", "--typo_flag=1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("INFO: STARTING!\nWARN: Unconsumed cmdline flags: --typo_flag=1\n")
    assert f"INFO: Graph: [{tiny_tflite}]" in out and "INFO: Num threads: [1]" in out
    warmup, measured = (tuple(map(float, m)) for m in STATS_RE.findall(out))
    assert warmup[0] == 2 and measured[0] == 20
    _count, _first, curr, low, high, avg, _std, p5, median, p95 = measured
    assert 0 < low <= p5 <= median <= p95 <= high and low <= avg <= high and low <= curr <= high
    init, first_inference, warmup_avg, inference_avg = map(float, SUMMARY_RE.search(out).groups())
    assert init > 0 and first_inference == warmup[1] and warmup_avg == warmup[5] and inference_avg == avg
    assert "Initialized session in" in out and "Memory footprint delta" in out


def test_fake_benchmark_honours_min_secs_and_reports_gpu_delegation(tiny_tflite):
    started = time.monotonic()
    result = run_fake(f"--graph={tiny_tflite}", "--warmup_runs=1", "--warmup_min_secs=0", "--num_runs=1", "--min_secs=0.5")
    assert time.monotonic() - started >= 0.5
    assert int(STATS_RE.findall(result.stdout)[-1][0]) > 1  # more runs than asked, to fill 0.5 s
    gpu = run_fake(f"--graph={tiny_tflite}", *QUICK.split(), "--use_gpu=true").stdout
    assert "INFO: Created TensorFlow Lite delegate for GPU.\n" in gpu
    assert (
        "VERBOSE: Replacing 1 out of 1 node(s) with delegate (TfLiteGpuDelegateV2) node,"
        " yielding 1 partitions for the whole graph.\n" in gpu
    )
    assert "the model graph will be completely executed by the delegate." in gpu
    bad = run_fake(f"--graph={tiny_tflite}", "--num_threads=four")
    assert bad.returncode == 1 and "Failed to parse flag '--num_threads=four'" in bad.stdout


def test_fake_benchmark_faults_through_the_daemon(tmp_path, adb_key, tiny_tflite):
    faults = Faults(
        hang_models=("hang",), garbage_models=("garbage",), crash_models=("crash",), partial_gpu_models=("partial",)
    )
    names = ("ok.tflite", "garbage.tflite", "crash.tflite", "partial.tflite", "hang.tflite")
    with LoopbackAdbDaemon(tmp_path / "device", authorized_keys=[adb_key[1]], faults=faults) as running:
        device = connect(running, adb_key[0])
        push_benchmark(device, {name: tiny_tflite for name in names})
        run = f"cd {REMOTE_DIR} && ./benchmark_model {QUICK}"
        hang_run = f"cd {REMOTE_DIR} && timeout 1 ./benchmark_model {QUICK}"
        ok = device.shell(f"{run} --graph={REMOTE_DIR}/ok.tflite; echo status=$?")
        assert SUMMARY_RE.search(ok) and ok.endswith("status=0\n")
        assert f"INFO: Graph: [{REMOTE_DIR}/ok.tflite]" in ok  # device path, as on the phone
        garbage = device.shell(f"{run} --graph=garbage.tflite; echo status=$?")
        assert "count=" not in garbage and "Inference timings" not in garbage and garbage.endswith("status=0\n")
        crash = device.shell(f"{run} --graph=crash.tflite; echo status=$?")
        assert "ERROR: Node number 0 (CONV_2D) failed to prepare." in crash and crash.endswith("status=134\n")
        partial = device.shell(f"{run} --graph=partial.tflite --use_gpu=true")
        assert "Replacing 1 out of 2 node(s) with delegate (TfLiteGpuDelegateV2) node, yielding 1 partitions" in partial
        assert "partially executed by the delegate w/ 1 delegate kernels." in partial
        started = time.monotonic()
        hang = device.shell(f"{hang_run} --graph=hang.tflite; echo status=$?")
        assert hang.endswith("status=124\n") and "Loaded model" in hang and time.monotonic() - started < 10
        assert running.models_run == 4  # every run but the hung one


def test_drop_after_models_resets_the_connection_once(tmp_path, adb_key, tiny_tflite):
    models = {f"m{i}.tflite": tiny_tflite for i in range(4)}
    batch = "; ".join(
        f"./benchmark_model {QUICK} --graph={name} > {name}.out 2>&1; echo {name} status=$?" for name in models
    )
    with LoopbackAdbDaemon(tmp_path / "device", authorized_keys=[adb_key[1]], faults=Faults(drop_after_models=2)) as running:
        device = connect(running, adb_key[0])
        push_benchmark(device, models)
        with pytest.raises(ConnectionResetError):
            device.shell(f"cd {REMOTE_DIR} && {batch}")
        assert running.models_run == 2
        phone_dir = running.root / "phonefit"
        assert SUMMARY_RE.search((phone_dir / "m1.tflite.out").read_text())
        assert (phone_dir / "m2.tflite.out").read_text() == ""  # hung up before it printed anything
        again = connect(running, adb_key[0])
        assert running.connections == 2
        output = again.shell(f"cd {REMOTE_DIR} && {batch}")
        assert output.splitlines() == [f"{name} status=0" for name in models]  # one-shot: no second drop
        assert running.models_run == 6


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def _process_group(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[2])
    except OSError:
        return None


def _ignores_hup(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(ignored, 16) & 1 << (signal.SIGHUP - 1))


def _wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_lost_connection_hangs_up_the_shells_group_and_closing_kills_its_session(tmp_path, adb_key):
    # As on a phone: the hang-up reaches the shell's process group only, so `timeout` (which
    # makes a group of its own) and `nohup` survive it; closing the daemon ends them too.
    command = (
        "sleep 60 & echo in_group $!; "
        "timeout 60 sleep 61 & echo own_group $!; "
        "nohup sleep 62 > /dev/null 2>&1 & echo nohup $!; "
        "timeout --foreground 60 sleep 63 & echo foreground $!; "
        "wait"
    )
    with LoopbackAdbDaemon(tmp_path / "device", authorized_keys=[adb_key[1]]) as running:
        device = connect(running, adb_key[0])
        text = ""
        for chunk in device.streaming_shell(command):
            text += chunk
            if text.count("\n") == 4:
                break
        pids = {name: int(pid) for name, pid in (line.split() for line in text.splitlines())}
        assert all(_alive(pid) for pid in pids.values())
        # Before hanging up: timeout has made its group, and nohup ignores SIGHUP.
        assert _wait_until(lambda: _process_group(pids["own_group"]) == pids["own_group"] and _ignores_hup(pids["nohup"]))
        device.close()  # the connection is lost: the daemon hangs up its commands
        assert _wait_until(lambda: not _alive(pids["in_group"]) and not _alive(pids["foreground"]))
        assert _alive(pids["own_group"]) and _alive(pids["nohup"])
    assert _wait_until(lambda: not any(_alive(pid) for pid in pids.values()))
