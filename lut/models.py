"""The named model architectures phonefit knows, and loading users' `.keras` files.

Profiling only needs a model's structure, so `build_model` makes untrained models
(`weights=None`) unless asked otherwise; the adapter trains them.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from lut.spec import LutError

__all__ = ["MODELS", "register_model", "build_model", "load_model"]

# name -> factory(alpha, resolution, classes, weights) -> keras.Model
MODELS: dict[str, Callable] = {}


def register_model(name: str) -> Callable:
    def decorator(factory: Callable) -> Callable:
        MODELS[name] = factory
        return factory

    return decorator


@register_model("mobilenet_v1")
def _mobilenet_v1(alpha: float, resolution: int, classes: int, weights: str | None):
    import keras

    return keras.applications.MobileNet(
        input_shape=(resolution, resolution, 3), alpha=alpha, weights=weights, classes=classes
    )


@register_model("mobilenet_v2")
def _mobilenet_v2(alpha: float, resolution: int, classes: int, weights: str | None):
    import keras

    return keras.applications.MobileNetV2(
        input_shape=(resolution, resolution, 3), alpha=alpha, weights=weights, classes=classes
    )


def build_model(name: str, *, alpha: float = 1.0, resolution: int = 224, classes: int = 1000, weights: str | None = None):
    """A registered architecture; unknown names raise `LutError` listing the known ones."""
    if name not in MODELS:
        raise LutError(f"Unknown model {name!r}. Known models: {', '.join(sorted(MODELS))}, or a path to a .keras file.")
    if not 0 < alpha <= 4:
        raise LutError(f"`alpha` must be in (0, 4]. Received: alpha={alpha}.")
    if resolution < 32:
        raise LutError(f"`resolution` must be at least 32. Received: resolution={resolution}.")
    if classes < 2:
        raise LutError(f"`classes` must be at least 2. Received: classes={classes}.")
    return MODELS[name](alpha, resolution, classes, weights)


def load_model(name_or_path: str, *, alpha: float = 1.0, resolution: int = 224, classes: int = 1000):
    """A `.keras` file, or a registered architecture built with the given options."""
    if name_or_path.endswith(".keras") or os.path.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise LutError(f"No model file at {name_or_path}. Pass a .keras file or one of: {', '.join(sorted(MODELS))}.")
        import keras

        try:
            return keras.models.load_model(name_or_path, compile=False)
        except (ValueError, OSError) as e:
            raise LutError(f"Could not load {name_or_path} as a Keras model: {e}") from e
    return build_model(name_or_path, alpha=alpha, resolution=resolution, classes=classes)
