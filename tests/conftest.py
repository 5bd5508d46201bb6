import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The loopback ADB daemon's shells must hang up on SIGHUP as a phone's do, also when the
# suite itself runs under nohup (which would pass SIG_IGN down to every child).
signal.signal(signal.SIGHUP, signal.SIG_DFL)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_v1():
    """MobileNetV1 α=0.25 at 32×32, 10 classes: converts in about a second."""
    from lut.models import build_model

    return build_model("mobilenet_v1", alpha=0.25, resolution=32, classes=10)


@pytest.fixture(scope="session")
def tiny_v2():
    from lut.models import build_model

    return build_model("mobilenet_v2", alpha=0.25, resolution=32, classes=10)
