import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The loopback ADB daemon's shells must hang up on SIGHUP as a phone's do, also when the
# suite itself runs under nohup (which would pass SIG_IGN down to every child).
signal.signal(signal.SIGHUP, signal.SIG_DFL)
# Likewise Ctrl-C: a suite started in the background by a shell without job control inherits
# SIGINT ignored, and so would the commands the interrupt tests send it to.
signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

from profiler.monitor import MonitorPolicy  # noqa: E402

# Tests run on shared, loaded machines: where a test is not about the conditions monitor,
# the monitor still runs (a reference after every chunk) but trusts what it sees.
LENIENT = MonitorPolicy(tolerance_pct=1000.0, busy_cores=1000.0, wait_s=0.0)
LENIENT_FLAGS = ("--tolerance", "1000", "--busy-cores", "1000", "--wait-quiet", "0")


@pytest.fixture(scope="session")
def tiny_v1():
    """MobileNetV1 α=0.25 at 32×32, 10 classes: converts in about a second."""
    from lut.models import build_model

    return build_model("mobilenet_v1", alpha=0.25, resolution=32, classes=10)


@pytest.fixture(scope="session")
def tiny_v2():
    from lut.models import build_model

    return build_model("mobilenet_v2", alpha=0.25, resolution=32, classes=10)
