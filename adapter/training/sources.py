"""Where image data comes from: Fashion-MNIST (Debian's IDX files), an image folder or an .npz.

`load_dataset` reads a source (a registered name, an `.npz`, an image folder) and splits it
into an `adapter.training.data.Dataset`; `register_dataset` adds a named source.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from adapter.errors import AdapterError
from adapter.training.data import DEFAULT_HOLDOUT, Dataset, Split
from adapter.training.idx import read_idx

__all__ = [
    "DATASET_LOADERS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR_ENV",
    "RawDataset",
    "load_dataset",
    "register_dataset",
]

FASHION_MNIST_DIR_ENV = "PHONEFIT_FASHION_MNIST_DIR"
_FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_MNIST_FILES = {  # role -> (file stem, dimensions of its IDX array)
    "x_train": ("train-images-idx3-ubyte", 3),
    "y_train": ("train-labels-idx1-ubyte", 1),
    "x_test": ("t10k-images-idx3-ubyte", 3),
    "y_test": ("t10k-labels-idx1-ubyte", 1),
}

# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True, eq=False)
class RawDataset:
    """What a source yields before splitting: NHWC images (uint8, or float32 in [0, 1]).

    `train_indices` / `test_indices`: each image's position in the source's own listing,
    where the source had to be split here (an .npz with x, y; an image folder); else None.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    train_indices: np.ndarray | None = None
    test_indices: np.ndarray | None = None


DatasetLoader = Callable[[int, int, float], RawDataset]  # (resolution, seed, test_fraction)
DATASET_LOADERS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Make `name` a data set `load_dataset` knows by name."""

    def register(loader: DatasetLoader) -> DatasetLoader:
        if name in DATASET_LOADERS:
            raise ValueError(f"A data set named {name!r} is already registered.")
        DATASET_LOADERS[name] = loader
        return loader

    return register


@register_dataset("fashion_mnist")
def _load_fashion_mnist(resolution: int, seed: int, test_fraction: float) -> RawDataset:
    """Fashion-MNIST from its four IDX files (Debian: `apt-get install dataset-fashion-mnist`)."""
    folder = Path(os.environ.get(FASHION_MNIST_DIR_ENV) or _FASHION_MNIST_DEFAULT_DIR)
    arrays = {}
    for role, (stem, ndim) in _FASHION_MNIST_FILES.items():
        path = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
        if path is None:
            raise AdapterError(
                f"Fashion-MNIST was not found: expected {stem}[.gz] in {folder}. Install it with "
                f"`apt-get install dataset-fashion-mnist`, or set {FASHION_MNIST_DIR_ENV} to the "
                "folder holding its four IDX files."
            )
        arrays[role] = read_idx(path)
        if arrays[role].ndim != ndim:
            raise AdapterError(
                f"{path} should hold {'images' if ndim == 3 else 'labels'} (an IDX array with "
                f"{ndim} dimensions, magic 0x0000080{ndim}); received {arrays[role].ndim} dimensions."
            )
    return RawDataset(
        x_train=arrays["x_train"][..., None],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"][..., None],
        y_test=arrays["y_test"],
        class_names=FASHION_MNIST_CLASSES,
    )


def _open_npz(path: Path):
    """`np.load` of an .npz, or `AdapterError` saying what the file is instead."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(6)
        what = "a single .npy array" if head.startswith(b"\x93NUMPY") else f"not a zip archive ({head!r}…)"
        raise AdapterError(
            f"{path} is {what}; expected an .npz, the zip of arrays np.savez writes "
            "(x_train, y_train, x_test, y_test, or x, y). Save the arrays with np.savez."
        )
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise AdapterError(f"{path} is a damaged .npz ({type(e).__name__}: {e}); save the arrays again with np.savez.") from e


def _load_npz(path: Path, seed: int, test_fraction: float) -> RawDataset:
    """x_train/y_train/x_test/y_test, or x/y split into train and test here."""
    positions = {}
    try:
        with _open_npz(path) as npz:
            keys = set(npz.files)
            if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            elif {"x", "y"} <= keys:
                x, y = _images(npz["x"], f"{path}:x"), _labels(npz["y"], f"{path}:y", len(npz["x"]))
                train, test = _train_test_indices(len(y), test_fraction, seed)
                arrays = {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}
                positions = {"train_indices": train, "test_indices": test}
            else:
                raise AdapterError(
                    f"{path} should hold arrays x_train, y_train, x_test, y_test (or x, y); "
                    f"received {sorted(keys)}."
                )
    except AdapterError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # object arrays, damaged members
        raise AdapterError(f"{path} holds arrays that cannot be read ({type(e).__name__}: {e}); expected plain numeric "
                           "arrays as np.savez writes them. Save them again.") from e
    x_train, x_test = (_images(arrays[k], f"{path}:{k}") for k in ("x_train", "x_test"))
    y_train = _labels(arrays["y_train"], f"{path}:y_train", len(x_train))
    y_test = _labels(arrays["y_test"], f"{path}:y_test", len(x_test))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise AdapterError(
            f"{path}: train and test images must have one shape; received {x_train.shape[1:]} "
            f"and {x_test.shape[1:]}."
        )
    classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return RawDataset(x_train, y_train, x_test, y_test, tuple(str(c) for c in range(classes)), **positions)


def _load_image_folder(path: Path, resolution: int, seed: int, test_fraction: float) -> RawDataset:
    """One subfolder per class; or `train/` and `test/` folders that each have them."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        x_train, y_train, names = _read_image_folder(path / "train", resolution)
        x_test, y_test, test_names = _read_image_folder(path / "test", resolution)
        if test_names != names:
            raise AdapterError(
                f"{path}/train and {path}/test must have the same class folders; received "
                f"{list(names)} and {list(test_names)}."
            )
        return RawDataset(x_train, y_train, x_test, y_test, names)
    x, y, names = _read_image_folder(path, resolution)
    train, test = _train_test_indices(len(y), test_fraction, seed)
    return RawDataset(x[train], y[train], x[test], y[test], names, train_indices=train, test_indices=test)


def _read_image_folder(path: Path, resolution: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    # TensorFlow loads with Keras: imported on use, so --help and bad input answer at once
    import keras

    try:
        ds = keras.utils.image_dataset_from_directory(
            path, labels="inferred", label_mode="int", color_mode="rgb", batch_size=None,
            image_size=(resolution, resolution), shuffle=False, verbose=False,
        )
    except ValueError as e:
        raise AdapterError(
            f"{path} is not a usable image folder ({e}). Expected one subfolder of images per class."
        ) from e
    images, labels = [], []
    for x, y in ds.batch(512):
        images.append(np.clip(np.rint(x.numpy()), 0, 255).astype(np.uint8))
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels).astype(np.int32), tuple(ds.class_names)


def _images(x: np.ndarray, what: str) -> np.ndarray:
    """NHWC images, uint8 or float32 in [0, 1], from what an .npz holds."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise AdapterError(f"{what} must be images (N, H, W) or (N, H, W, 1 or 3); received shape {x.shape}.")
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if np.issubdtype(x.dtype, np.integer) and 0 <= low and high <= 255:
        return x.astype(np.uint8, copy=False)
    if np.issubdtype(x.dtype, np.floating) and 0 <= low and high <= 1:
        return x.astype(np.float32, copy=False)
    raise AdapterError(
        f"{what} must be integers in 0..255 or floats in [0, 1]; received {x.dtype} in "
        f"[{low:g}, {high:g}]. Store raw pixels, not preprocessed ones."
    )


def _labels(y: np.ndarray, what: str, count: int) -> np.ndarray:
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or len(y) != count or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise AdapterError(
            f"{what} must be {count} integer class indices ≥ 0 (not one-hot); received "
            f"{y.dtype} of shape {y.shape}."
        )
    return y.astype(np.int32)


def _train_test_indices(count: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test positions: a reproducible random `test_fraction` (≥ 1) is test."""
    if count < 2:
        raise AdapterError(f"Splitting into train and test needs at least 2 images; received {count}.")
    size = min(count - 1, max(1, round(count * test_fraction)))
    test = np.sort(np.random.default_rng(seed).permutation(count)[:size])
    return np.setdiff1d(np.arange(count), test), test


# --------------------------------------------------------------------------- load_dataset


def load_dataset(
    source: str | os.PathLike,
    *,
    resolution: int,
    holdout: int = DEFAULT_HOLDOUT,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load `source` as train / holdout / test splits of model input at `resolution` px.

    `source`: a registered name (`"fashion_mnist"`), an `.npz` file (x_train, y_train,
    x_test, y_test; or x, y) or an image folder (one subfolder per class; or `train/` and
    `test/` folders holding those). The `holdout` images are drawn at random, with `seed`,
    from the training data; the same source, holdout size and seed always give the same
    splits, and a smaller holdout is a subset of a larger one. `test_fraction` of the images
    becomes the test split where the source has no test set of its own.
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise AdapterError(f"resolution must be a positive integer; received resolution={resolution!r}.")
    if not isinstance(holdout, int) or holdout < 0:
        raise AdapterError(f"holdout must be an integer ≥ 0; received holdout={holdout!r}.")
    if not 0 < test_fraction < 1:
        raise AdapterError(f"test_fraction must be in (0, 1); received test_fraction={test_fraction!r}.")
    name, raw = _read_source(source, resolution, seed, test_fraction)
    if holdout >= len(raw.y_train):
        raise AdapterError(
            f"holdout must leave training images: expected at most {len(raw.y_train) - 1} for "
            f"{name} ({len(raw.y_train)} training images); received holdout={holdout}."
        )
    num_classes = max(len(raw.class_names), int(raw.y_train.max()) + 1, int(raw.y_test.max(initial=0)) + 1)
    order = np.random.default_rng(seed).permutation(len(raw.y_train))

    def split(images, labels, rows, positions) -> Split:
        return Split(images=images[rows], labels=labels[rows].astype(np.int32),
                     indices=rows if positions is None else positions[rows], resolution=resolution)

    return Dataset(
        name=name,
        train=split(raw.x_train, raw.y_train, order[holdout:], raw.train_indices),
        holdout=split(raw.x_train, raw.y_train, order[:holdout], raw.train_indices),
        test=split(raw.x_test, raw.y_test, np.arange(len(raw.y_test)), raw.test_indices),
        num_classes=num_classes,
        class_names=raw.class_names,
    )


def _read_source(source, resolution: int, seed: int, test_fraction: float) -> tuple[str, RawDataset]:
    text = os.fspath(source)
    if text in DATASET_LOADERS:
        return text, DATASET_LOADERS[text](resolution, seed, test_fraction)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.name, _load_image_folder(path, resolution, seed, test_fraction)
    if path.is_file() and path.suffix == ".npz":
        return path.stem, _load_npz(path, seed, test_fraction)
    raise AdapterError(
        f"Unknown data set {text!r}: expected one of {sorted(DATASET_LOADERS)}, an image folder "
        f"or an .npz file{'' if path.exists() else ' (no such file or folder)'}."
    )
