"""The named architectures phonefit profiles, trains and adapts: keras.applications' MobileNetV1 and V2.

Models take (resolution, resolution, 3) float32 input scaled to [-1, 1] (what
`adapter.training.data` produces; the models hold no preprocessing layer) and end in a softmax over
`classes`. The classifier head is keras.applications' own, layer for layer and name for
name, and is built here so that a model with ImageNet weights (whose keras.applications
head only exists for 1000 classes) has the same head for any number of classes:
`weights="imagenet"` loads the ImageNet backbone and adds a new, randomly initialised head.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lut.keras_graph import as_functional
from lut.spec import LutError

__all__ = [
    "MIN_RESOLUTION",
    "MODELS",
    "ModelSpec",
    "as_functional",
    "build_model",
    "load_model",
    "register_model",
]

MIN_RESOLUTION = 32  # keras.applications' MobileNets refuse smaller inputs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture: its backbone, its head and its ImageNet widths."""

    name: str
    backbone: Callable[[float, tuple[int, int, int], str | None], Any]  # (alpha, input_shape, weights) -> headless keras.Model
    head: Callable[[Any, int], Any]  # (features, classes) -> softmax output tensor
    imagenet_alphas: tuple[float, ...]


MODELS: dict[str, ModelSpec] = {}


_Backbone = Callable[[float, tuple[int, int, int], str | None], Any]


def register_model(
    name: str, *, head: Callable[[Any, int], Any], imagenet_alphas: tuple[float, ...]
) -> Callable[[_Backbone], _Backbone]:
    """Register the decorated `backbone(alpha, input_shape, weights)` as model `name`.

    `head(features, classes)` puts the classifier on the backbone's output; `imagenet_alphas`
    are the widths that have ImageNet weights.
    """

    def register(backbone: _Backbone) -> _Backbone:
        if name in MODELS:
            raise ValueError(f"A model named {name!r} is already registered.")
        MODELS[name] = ModelSpec(name, backbone, head, tuple(imagenet_alphas))
        return backbone

    return register


def _mobilenet_v1_head(features: Any, classes: int) -> Any:
    # TensorFlow loads with Keras: imported on use, so --help and bad input answer at once
    from keras import layers

    x = layers.GlobalAveragePooling2D(keepdims=True)(features)
    x = layers.Dropout(1e-3, name="dropout")(x)
    x = layers.Conv2D(classes, (1, 1), padding="same", name="conv_preds")(x)
    x = layers.Reshape((classes,), name="reshape_2")(x)
    return layers.Activation("softmax", name="predictions")(x)


def _mobilenet_v2_head(features: Any, classes: int) -> Any:
    # TensorFlow loads with Keras: imported on use, so --help and bad input answer at once
    from keras import layers

    x = layers.GlobalAveragePooling2D()(features)
    return layers.Dense(classes, activation="softmax", name="predictions")(x)


@register_model("mobilenet_v1", head=_mobilenet_v1_head, imagenet_alphas=(0.25, 0.5, 0.75, 1.0))
def _mobilenet_v1(alpha: float, input_shape: tuple[int, int, int], weights: str | None) -> Any:
    # TensorFlow loads with Keras: imported on use, so --help and bad input answer at once
    import keras

    return keras.applications.MobileNet(
        input_shape=input_shape, alpha=alpha, include_top=False, weights=weights
    )


@register_model(
    "mobilenet_v2", head=_mobilenet_v2_head, imagenet_alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
)
def _mobilenet_v2(alpha: float, input_shape: tuple[int, int, int], weights: str | None) -> Any:
    # TensorFlow loads with Keras: imported on use, so --help and bad input answer at once
    import keras

    return keras.applications.MobileNetV2(
        input_shape=input_shape, alpha=alpha, include_top=False, weights=weights
    )


def build_model(
    name: str,
    *,
    alpha: float = 1.0,
    resolution: int = 224,
    classes: int = 1000,
    weights: str | None = None,
) -> Any:
    """A new `name` model: width multiplier `alpha`, input (resolution, resolution, 3).

    `weights`: None (random initialisation) or "imagenet" (downloads the ImageNet backbone
    once into ~/.keras/models; `alpha` must be one keras.applications has weights for; at a
    resolution it has no weights for, Keras warns and loads its 224 px ones, which fit any
    size; the classifier head is always new).
    """
    spec = _spec(name)
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise LutError(f"alpha must be a positive number; received alpha={alpha!r}.")
    if not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise LutError(
            f"resolution must be an integer ≥ {MIN_RESOLUTION} for {name}; "
            f"received resolution={resolution!r}."
        )
    if not isinstance(classes, int) or classes < 2:
        raise LutError(f"classes must be an integer ≥ 2; received classes={classes!r}.")
    if weights not in (None, "imagenet"):
        raise LutError(f"weights must be None or 'imagenet'; received weights={weights!r}.")
    if weights == "imagenet" and float(alpha) not in spec.imagenet_alphas:
        raise LutError(
            f"ImageNet weights for {name} exist for alpha in {list(spec.imagenet_alphas)}; "
            f"received alpha={alpha}. Use one of those, or weights=None."
        )
    return _assemble(spec, float(alpha), resolution, classes, weights)


def _assemble(spec: ModelSpec, alpha: float, resolution: int, classes: int, weights: str | None) -> Any:
    # TensorFlow loads with Keras: imported on use, so --help and bad input answer at once
    import keras

    try:
        backbone = spec.backbone(alpha, (resolution, resolution, 3), weights)
    except Exception as e:  # keras.utils.get_file raises a bare Exception when offline
        if weights is None:
            raise
        raise LutError(
            f"Could not load ImageNet weights for {spec.name} ({e}). They are downloaded on "
            "first use: connect to the internet once, or use weights=None."
        ) from e
    outputs = spec.head(backbone.output, classes)
    return keras.Model(backbone.input, outputs, name=f"{spec.name}_{alpha:g}_{resolution}")


def load_model(path_or_name: str | os.PathLike[str], **build_kwargs: Any) -> Any:
    """A saved model (a `.keras` file, loaded uncompiled) or a new one built by name.

    `build_kwargs` (alpha, resolution, classes, weights) apply to names only; a file is
    loaded as it was saved.
    """
    text = os.fspath(path_or_name)
    if text in MODELS:
        return build_model(text, **build_kwargs)
    if not text.endswith(".keras"):
        raise LutError(
            f"Unknown model {text!r}: expected one of {sorted(MODELS)} or a path to a .keras file."
        )
    path = Path(text)
    if path.is_dir():
        raise LutError(f"Model file {text} is a folder; expected a .keras file (model.save('x.keras')).")
    if not path.is_file():
        raise LutError(f"Model file {text} does not exist: train one with `python -m adapter.train`.")
    _check_keras_archive(path)
    # TensorFlow loads with Keras: imported on use, so --help and bad input answer at once
    import keras

    try:
        model = keras.models.load_model(text, compile=False)
    except Exception as e:  # Keras raises ValueError, KeyError, TypeError, OSError… for a damaged archive
        reason = " ".join(str(e).split())[:300]
        raise LutError(
            f"Could not load {text} as a Keras model: {type(e).__name__}: {reason}. Expected a model saved by "
            "model.save('x.keras') with this Keras; save it again (custom layers must be importable)."
        ) from e
    return as_functional(model, text)


def _check_keras_archive(path: Path) -> None:
    """A `.keras` file is a zip archive holding config.json: say what the file is when it is not."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        size = path.stat().st_size
    except OSError as e:
        raise LutError(f"Cannot read the model file {path}: {e.strerror}. Check its permissions.") from e
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise LutError(
                    f"{path} is a zip archive without config.json; expected a Keras model saved by model.save('x.keras')."
                )
        return
    if head.startswith(b"PK"):
        what = f"a damaged or truncated zip archive ({size} bytes)"
    elif head.startswith(b"\x89HDF"):
        what = "an HDF5 file (Keras 2's .h5 format)"
    elif size == 0:
        what = "an empty file"
    else:
        what = f"not a zip archive ({size} bytes starting {head!r})"
    raise LutError(
        f"{path} is {what}; expected a .keras model, the zip archive model.save('x.keras') writes. "
        "Save the model again (a truncated file: copy it again)."
    )


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise LutError(f"Unknown model {name!r}: expected one of {sorted(MODELS)}.")
    return MODELS[name]
