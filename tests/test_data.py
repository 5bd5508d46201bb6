"""adapter.training.data: the IDX parser, the holdout carved from training data, the three sources."""
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from adapter.errors import AdapterError
from adapter.training.data import Split
from adapter.training.idx import parse_idx, read_idx
from adapter.training.sources import FASHION_MNIST_DIR_ENV, load_dataset

FASHION_MNIST = Path(os.environ.get(FASHION_MNIST_DIR_ENV) or "/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist",
)


def _idx_bytes(array: np.ndarray, type_byte: int) -> bytes:
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.fixture(scope="module")
def fashion_mnist_32():
    return load_dataset("fashion_mnist", resolution=32, holdout=1000)


# --------------------------------------------------------------------------- IDX


@needs_fashion_mnist
def test_idx_parser_reads_the_debian_fashion_mnist_files():
    shapes = {
        "train-images-idx3-ubyte.gz": (60000, 28, 28),
        "train-labels-idx1-ubyte.gz": (60000,),
        "t10k-images-idx3-ubyte.gz": (10000, 28, 28),
        "t10k-labels-idx1-ubyte.gz": (10000,),
    }
    arrays = {name: read_idx(FASHION_MNIST / name) for name in shapes}
    assert {name: a.shape for name, a in arrays.items()} == shapes
    assert all(a.dtype == np.uint8 for a in arrays.values())
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class 0..9.
    assert np.bincount(arrays["train-labels-idx1-ubyte.gz"]).tolist() == [6000] * 10
    assert np.bincount(arrays["t10k-labels-idx1-ubyte.gz"]).tolist() == [1000] * 10
    assert arrays["train-images-idx3-ubyte.gz"].max() == 255


def test_idx_parser_reads_big_endian_dimensions_and_values():
    ints = np.arange(-3, 3, dtype=np.int32).reshape(2, 3) * 70000
    floats = np.array([[0.5, -2.25]], dtype=np.float32)
    assert np.array_equal(parse_idx(_idx_bytes(ints, 0x0C)), ints)
    assert np.array_equal(parse_idx(_idx_bytes(floats, 0x0D)), floats)
    assert parse_idx(_idx_bytes(np.zeros((300, 2), np.uint8), 0x08)).shape == (300, 2)


def test_file_with_a_bad_magic_number_is_refused_with_what_was_read(tmp_path):
    bad = tmp_path / "images.idx"
    bad.write_bytes(b"\x00\x00\x07\x03" + bytes(16))
    with pytest.raises(AdapterError, match=r"not an IDX file.*received 0x00000703"):
        read_idx(bad)
    png = tmp_path / "image.gz"
    png.write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(10)))
    with pytest.raises(AdapterError, match=r"not an IDX file.*received 0x89504E47"):
        read_idx(png)


def test_truncated_idx_file_is_refused_with_expected_and_received_sizes(tmp_path):
    raw = _idx_bytes(np.zeros((10, 28, 28), np.uint8), 0x08)
    short = tmp_path / "short.idx"
    short.write_bytes(raw[:-5])
    with pytest.raises(AdapterError, match=r"expected 7840 data bytes for dimensions 10×28×28; received 7835"):
        read_idx(short)
    broken_gzip = tmp_path / "short.idx.gz"
    broken_gzip.write_bytes(gzip.compress(raw)[:-12])  # cut inside the stream
    with pytest.raises(AdapterError, match="damaged gzip"):
        read_idx(broken_gzip)


@needs_fashion_mnist
def test_labels_file_in_place_of_images_is_refused(tmp_path, monkeypatch):
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(FASHION_MNIST / name)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros((5, 2, 2), np.uint8), 0x08))
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(AdapterError, match=r"should hold labels.*magic 0x00000801.*received 3 dimensions"):
        load_dataset("fashion_mnist", resolution=32)


def test_missing_fashion_mnist_says_how_to_install_or_point_to_it(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(AdapterError) as error:
        load_dataset("fashion_mnist", resolution=32)
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert FASHION_MNIST_DIR_ENV in message and str(tmp_path) in message
    assert isinstance(error.value, ValueError)


def test_unknown_source_lists_the_named_data_sets():
    with pytest.raises(AdapterError, match=r"expected one of \['fashion_mnist'\].*no such file"):
        load_dataset("/nonexistent/cifar", resolution=32)


# --------------------------------------------------------------------------- splits


@needs_fashion_mnist
def test_holdout_is_drawn_from_the_training_files_and_disjoint_from_train(fashion_mnist_32):
    data = fashion_mnist_32
    assert (len(data.train), len(data.holdout), len(data.test)) == (59000, 1000, 10000)
    assert set(data.holdout.indices).isdisjoint(data.train.indices)
    assert sorted(np.concatenate([data.train.indices, data.holdout.indices])) == list(range(60000))
    train_file = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")
    train_labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    assert np.array_equal(data.holdout.images[..., 0], train_file[data.holdout.indices])
    assert np.array_equal(data.holdout.labels, train_labels[data.holdout.indices])
    assert np.array_equal(data.test.indices, np.arange(10000))
    assert data.num_classes == 10 and data.class_names[9] == "Ankle boot"


@needs_fashion_mnist
def test_same_seed_gives_same_holdout_and_a_smaller_one_is_a_subset(fashion_mnist_32):
    smaller = load_dataset("fashion_mnist", resolution=32, holdout=400)
    assert np.array_equal(smaller.holdout.indices, fashion_mnist_32.holdout.indices[:400])
    other_seed = load_dataset("fashion_mnist", resolution=32, holdout=400, seed=1)
    assert len(set(other_seed.holdout.indices) & set(smaller.holdout.indices)) < 40


@needs_fashion_mnist
def test_fashion_mnist_is_padded_to_32_px_grey_in_three_channels_scaled_to_minus_one_one(fashion_mnist_32):
    split = fashion_mnist_32.holdout.take(64)
    x, y = split.arrays()
    assert x.shape == (64, 32, 32, 3) and x.dtype == np.float32
    assert np.array_equal(x[..., 0], x[..., 2])
    assert np.all(x[:, :2] == -1.0) and np.all(x[:, :, -2:] == -1.0)
    expected_centre = split.images[..., 0].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(x[:, 2:30, 2:30, 0], expected_centre, atol=1e-6)
    assert np.array_equal(y, split.labels)


@needs_fashion_mnist
def test_fashion_mnist_far_from_28_px_is_resized(fashion_mnist_32):
    split = Split(
        images=fashion_mnist_32.holdout.images[:16], labels=fashion_mnist_32.holdout.labels[:16],
        indices=fashion_mnist_32.holdout.indices[:16], resolution=56,
    )
    x, _ = split.arrays()
    assert x.shape == (16, 56, 56, 3)
    assert -1.0 <= x.min() and x.max() <= 1.0
    # Doubling the size keeps each image's mean brightness.
    source_means = split.images.astype(np.float32).mean(axis=(1, 2, 3)) / 127.5 - 1.0
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), source_means, atol=0.02)


@needs_fashion_mnist
def test_tf_dataset_yields_the_same_batches_as_arrays_and_shuffles_reproducibly(fashion_mnist_32):
    split = fashion_mnist_32.holdout.take(300)
    x, y = split.arrays()
    batches = list(split.tf_dataset(128))
    assert [len(b[1]) for b in batches] == [128, 128, 44]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    first = np.concatenate([b[1] for b in split.tf_dataset(100, shuffle=True, seed=3)])
    again = np.concatenate([b[1] for b in split.tf_dataset(100, shuffle=True, seed=3)])
    assert np.array_equal(first, again) and not np.array_equal(first, y)
    assert sorted(first) == sorted(y)
    assert [len(b[1]) for b in split.tf_dataset(128, drop_remainder=True)] == [128, 128]


# --------------------------------------------------------------------------- other sources


def _write_png_folder(root: Path, colours: dict[str, tuple[int, int, int]], per_class: int) -> None:
    from PIL import Image

    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((30, 40, 3), colour, np.uint8)
            pixels[i % 30, :, :] = 128  # make the images differ
            Image.fromarray(pixels).save(root / name / f"{i}.png")


COLOURS = {"blue": (0, 0, 250), "green": (0, 250, 0), "red": (250, 0, 0)}


def test_image_folder_classes_are_subfolders_and_the_test_split_is_reproducible(tmp_path):
    _write_png_folder(tmp_path / "shapes", COLOURS, per_class=6)
    data = load_dataset(tmp_path / "shapes", resolution=32, holdout=3, test_fraction=0.25)
    assert data.class_names == ("blue", "green", "red") and data.num_classes == 3
    assert (len(data.train), len(data.holdout), len(data.test)) == (11, 3, 4)  # 18 images, 1/4 test
    x, y = data.train.arrays()
    assert x.shape == (11, 32, 32, 3)
    # Each image's brightest channel is its class colour: blue → 2, green → 1, red → 0.
    assert np.array_equal(x.mean(axis=(1, 2)).argmax(axis=-1), 2 - y)
    again = load_dataset(tmp_path / "shapes", resolution=32, holdout=3, test_fraction=0.25)
    assert np.array_equal(again.test.images, data.test.images)
    assert np.array_equal(again.holdout.labels, data.holdout.labels)


def test_image_folder_with_train_and_test_folders_keeps_them(tmp_path):
    _write_png_folder(tmp_path / "train", COLOURS, per_class=4)
    _write_png_folder(tmp_path / "test", COLOURS, per_class=2)
    data = load_dataset(tmp_path, resolution=32, holdout=2)
    assert (len(data.train), len(data.holdout), len(data.test)) == (10, 2, 6)
    assert sorted(data.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_empty_image_folder_is_refused(tmp_path):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(AdapterError, match="not a usable image folder"):
        load_dataset(tmp_path / "empty", resolution=32, holdout=0)


def test_npz_with_train_and_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "digits.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (50, 20, 20), dtype=np.uint8), y_train=np.arange(50) % 5,
        x_test=rng.integers(0, 256, (8, 20, 20), dtype=np.uint8), y_test=np.arange(8) % 5,
    )
    data = load_dataset(path, resolution=32, holdout=10)
    assert data.name == "digits" and data.num_classes == 5
    assert (len(data.train), len(data.holdout), len(data.test)) == (40, 10, 8)
    x, _ = data.test.arrays()
    assert x.shape == (8, 32, 32, 3)  # 20 px is more than a quarter short of 32: resized


def test_npz_with_x_and_y_float_pixels_is_split_into_train_and_test(tmp_path):
    path = tmp_path / "colours.npz"
    x = np.linspace(0, 1, 100 * 32 * 32 * 3, dtype=np.float32).reshape(100, 32, 32, 3)
    np.savez(path, x=x, y=(np.arange(100) % 4).reshape(-1, 1))
    data = load_dataset(path, resolution=32, holdout=20, test_fraction=0.1)
    assert (len(data.train), len(data.holdout), len(data.test)) == (70, 20, 10)
    test_x, _ = data.test.arrays()
    np.testing.assert_allclose(test_x, x[data.test.indices] * 2 - 1, atol=1e-6)
    assert set(data.test.indices).isdisjoint(data.train.indices)


def test_npz_with_preprocessed_pixels_or_wrong_keys_is_refused(tmp_path):
    scaled = tmp_path / "scaled.npz"
    np.savez(scaled, x=np.full((10, 8, 8), -0.5, np.float32), y=np.zeros(10, int))
    with pytest.raises(AdapterError, match=r"floats in \[0, 1\]; received float32 in \[-0.5, -0.5\]"):
        load_dataset(scaled, resolution=32, holdout=1)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((10, 8, 8), np.uint8))
    with pytest.raises(AdapterError, match=r"x_train, y_train, x_test, y_test \(or x, y\); received \['images'\]"):
        load_dataset(wrong, resolution=32, holdout=1)


def test_holdout_must_leave_training_images(tmp_path):
    path = tmp_path / "small.npz"
    np.savez(path, x=np.zeros((10, 8, 8), np.uint8), y=np.zeros(10, int))
    with pytest.raises(AdapterError, match=r"expected at most 7 .*received holdout=8"):
        load_dataset(path, resolution=32, holdout=8)


@needs_fashion_mnist
def test_augmented_batches_hold_each_image_or_its_mirror(fashion_mnist_32):
    split = fashion_mnist_32.holdout.take(256)
    x, _ = split.arrays()
    (augmented, labels), = list(split.tf_dataset(256, augment=True, seed=1))
    augmented = np.asarray(augmented)
    same = np.all(augmented == x, axis=(1, 2, 3))
    mirrored = np.all(augmented == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and np.array_equal(labels, split.labels)
    assert 64 < mirrored.sum() < 192  # about half, at random
