"""One phone's ADB connection: RSA auth, clear errors when it cannot be had, and retries.

`Connection.retrying(action)` runs `action` and, when the connection drops, reconnects
with exponential backoff (`reconnect_tries`, `reconnect_backoff_s` of devices.toml) and
runs it again; every failure a user can act on is one `ProfilerError` line saying what to do.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from adb_shell import adb_device, exceptions
from adb_shell.auth.keygen import keygen, write_public_keyfile
from adb_shell.auth.sign_pythonrsa import PythonRSASigner

from profiler.adb.wire import check_adb_shell, tcp_transport
from profiler.device_config import AdbSettings
from profiler.errors import ProfilerError

__all__ = ["CONNECTION_ERRORS", "SETUP_TIMEOUT_S", "Connection", "RunnerInterrupted", "ensure_adb_key", "reason"]

LOG = logging.getLogger("phonefit.adb")
SETUP_TIMEOUT_S = 60.0  # any request but a batch's run
_T = TypeVar("_T")


class RunnerInterrupted(Exception):
    """The runner's shell ended without finishing the batch (the phone killed it)."""


# What a dropped or broken connection raises: reconnect and go on.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    RunnerInterrupted,
    exceptions.AdbConnectionError,
    exceptions.AdbTimeoutError,
    exceptions.TcpTimeoutException,
    exceptions.InvalidResponseError,
    exceptions.InvalidChecksumError,
    exceptions.InvalidCommandError,
    exceptions.UsbReadFailedError,
    exceptions.UsbWriteFailedError,
    exceptions.UsbDeviceNotFoundError,
)
# What a phone that is reached but refuses a file operation raises: no retry helps.
_REFUSALS = (exceptions.AdbCommandFailureException, exceptions.PushFailedError, exceptions.DevicePathInvalidError)


def ensure_adb_key(path: Path) -> Path:
    """`path` (an ADB private key) and `path.pub`, generated if missing; the private key is mode 0600."""
    path = Path(path).expanduser()
    public = Path(f"{path}.pub")
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file 0600 first: keygen rewrites it in place, keeping the mode.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            keygen(str(path))
        elif not public.exists():
            write_public_keyfile(str(path), str(public))
    except (OSError, ValueError) as e:
        raise ProfilerError(
            f"Cannot create the ADB key {path}: {e}. Set `adb_key` in devices.toml to a writable path. "
            f"Received: adb_key={str(path)!r}."
        ) from e
    return path


def reason(error: BaseException) -> str:
    """The first line of `error`, for a one-line message."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


class Connection:
    """The adb-shell connection to the phone of `settings`; `adb` is the connected device."""

    def __init__(self, settings: AdbSettings, *, sleep: Callable[[float], None] = time.sleep):
        check_adb_shell()
        self.settings, self._sleep = settings, sleep
        self._adb: adb_device.AdbDevice | None = None
        self._signer = self._load_signer()

    @property
    def adb(self) -> adb_device.AdbDevice:
        """The connected adb-shell device (`connect` or `retrying` first)."""
        if self._adb is None:
            raise RuntimeError(f"{self.settings.name} is not connected")
        return self._adb

    @property
    def connected(self) -> bool:
        return self._adb is not None and bool(self._adb.available)

    def connect_first(self) -> None:
        """Connect, or fail in one line saying how to reach the phone."""
        try:
            self.connect()
        except ProfilerError:
            raise
        except CONNECTION_ERRORS as e:
            raise ProfilerError(
                f"Cannot reach {self.settings.name} at {self.settings.address} ({reason(e)}). {self._how_to_reach()}"
            ) from e

    def connect(self) -> None:
        """(Re)connect: a USB phone replugged is found again by its serial."""
        if self._adb is None:
            self._adb = self._make_adb()
        adb, settings = self._adb, self.settings
        prompted = []
        try:
            adb.connect(
                rsa_keys=[self._signer],
                transport_timeout_s=settings.connect_timeout_s,
                auth_timeout_s=settings.auth_timeout_s,
                read_timeout_s=settings.connect_timeout_s,
                auth_callback=lambda _device: prompted.append(True),
            )
        except exceptions.DeviceAuthError as e:
            raise self._auth_error() from e
        except CONNECTION_ERRORS as e:
            adb.close()
            if prompted:  # it refused our signature, then did not accept the public key
                raise self._auth_error() from e
            raise

    def reconnect(self) -> adb_device.AdbDevice:
        """A fresh connection (after Ctrl-C, when the old stream cannot be trusted)."""
        if self._adb is not None:
            self._adb.close()
        self.connect()
        return self.adb

    def close(self) -> None:
        if self._adb is not None:
            self._adb.close()
            self._adb = None

    def retrying(self, action: Callable[[], _T]) -> _T:
        """`action()`, reconnecting with exponential backoff when the connection drops."""
        settings, failures = self.settings, 0
        while True:
            try:
                if not self.connected:
                    self.connect()
                return action()
            except _REFUSALS as e:
                raise ProfilerError(
                    f"{settings.name} refused a file operation in {settings.remote_dir}: {reason(e)}."
                ) from e
            except CONNECTION_ERRORS as e:
                if self._adb is not None:
                    self._adb.close()
                    if settings.transport == "usb":  # a replugged phone is a new USB device
                        self._adb = None
                failures += 1
                if failures > settings.reconnect_tries:
                    raise ProfilerError(
                        f"Lost the connection to {settings.name} at {settings.address} and could not go on after "
                        f"{settings.reconnect_tries} reconnects ({reason(e)}). Every result so far is saved: run the "
                        f"same command again to resume. {self._how_to_reach()}"
                    ) from e
                delay = settings.reconnect_backoff_s * 2 ** (failures - 1)
                LOG.warning("%s: connection lost (%s); reconnecting in %.1f s (try %d of %d)",
                            settings.name, reason(e), delay, failures, settings.reconnect_tries)
                self._sleep(delay)

    def _load_signer(self) -> PythonRSASigner:
        key = ensure_adb_key(self.settings.adb_key)
        try:
            return PythonRSASigner.FromRSAKeyPath(str(key))
        except (OSError, ValueError) as e:
            raise ProfilerError(
                f"`adb_key` must be an ADB private key (RSA, PEM). Received: adb_key={str(key)!r} ({e}). "
                f"Set `adb_key` of [{self.settings.name}] in {self.settings.source}."
            ) from e

    def _make_adb(self) -> adb_device.AdbDevice:
        settings = self.settings
        if settings.transport == "tcp":
            assert settings.host is not None and settings.port is not None  # parse_adb_settings sets both
            return adb_device.AdbDevice(tcp_transport(settings.host, settings.port),
                                        default_transport_timeout_s=SETUP_TIMEOUT_S)
        if adb_device.UsbTransport is None:
            raise ProfilerError(
                f"{settings.name} is a USB phone; USB needs libusb: pip install 'adb-shell[usb]'. "
                f"Received: transport='usb' in {settings.source}, adb-shell without its usb extra."
            )
        # Raises UsbDeviceNotFoundError, a connection error: unplugged phones are retried.
        return adb_device.AdbDeviceUsb(serial=settings.serial, default_transport_timeout_s=SETUP_TIMEOUT_S)

    def _auth_error(self) -> ProfilerError:
        settings = self.settings
        return ProfilerError(
            f"{settings.name} at {settings.address} did not accept this computer's ADB key {settings.adb_key}.pub: "
            "unlock the phone, accept the 'Allow debugging?' prompt (tick 'Always allow'), then run the command again."
        )

    def _how_to_reach(self) -> str:
        if self.settings.transport == "usb":
            return "Check the cable, that USB debugging is on, and that no adb server holds the phone (adb kill-server)."
        return (
            "Check that the phone is on the same network, that wireless debugging is on (or `adb tcpip 5555` was run "
            f"over USB), that {self.settings.address} is its address and port, and that no adb server holds it "
            "(adb kill-server)."
        )
