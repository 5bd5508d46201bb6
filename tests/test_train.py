"""lut.models and adapter.train: building the base models, fine-tuning, the train CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapter.errors import AdapterError
from adapter.train import (
    TrainingRecord,
    evaluate,
    evaluate_split,
    fit,
    main,
    recalibrate_batchnorm,
    record_path,
)
from adapter.training.sources import load_dataset
from lut.models import MODELS, build_model, load_model
from lut.spec import LutError

REPO = Path(__file__).resolve().parents[1]
needs_fashion_mnist = pytest.mark.skipif(
    not Path(os.environ.get("PHONEFIT_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def fashion_mnist():
    return load_dataset("fashion_mnist", resolution=32, holdout=1000)


def _run_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "adapter.train", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name, application", [("mobilenet_v1", "MobileNet"), ("mobilenet_v2", "MobileNetV2")])
def test_built_model_has_the_keras_applications_layers_and_head(name, application):
    import keras

    model = build_model(name, alpha=0.25, resolution=32, classes=7)
    reference = getattr(keras.applications, application)(
        input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=7
    )
    assert [type(layer).__name__ for layer in model.layers] == [type(layer).__name__ for layer in reference.layers]
    assert model.count_params() == reference.count_params()
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 7)
    assert model.layers[-1].name == "predictions"


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet50': expected one of \['mobilenet_v1', 'mobilenet_v2'\]"):
        build_model("resnet50", alpha=0.5, resolution=32, classes=10)
    with pytest.raises(LutError, match=r"or a path to a \.keras file"):
        load_model("resnet50")
    assert sorted(MODELS) == ["mobilenet_v1", "mobilenet_v2"]


def test_bad_model_arguments_are_refused_before_building():
    with pytest.raises(LutError, match=r"resolution must be an integer ≥ 32 .*received resolution=28"):
        build_model("mobilenet_v1", alpha=0.5, resolution=28, classes=10)
    with pytest.raises(LutError, match=r"alpha must be a positive number; received alpha=0"):
        build_model("mobilenet_v2", alpha=0, resolution=32, classes=10)
    # Checked before any download: keras.applications has no ImageNet weights for α=0.3.
    with pytest.raises(LutError, match=r"alpha in \[0.25, 0.5, 0.75, 1.0\]; received alpha=0.3"):
        build_model("mobilenet_v1", alpha=0.3, resolution=128, classes=10, weights="imagenet")
    with pytest.raises(LutError, match=r"weights must be None or 'imagenet'; received weights='random'"):
        build_model("mobilenet_v1", alpha=0.5, resolution=32, classes=10, weights="random")


def test_missing_model_file_says_how_to_make_one(tmp_path):
    with pytest.raises(LutError, match=r"does not exist: train one with `python -m adapter.train`"):
        load_model(tmp_path / "base.keras")


# --------------------------------------------------------------------------- fit / evaluate


def test_recalibrated_batchnorm_holds_the_statistics_of_the_given_images(fashion_mnist):
    import keras

    model = build_model("mobilenet_v2", alpha=0.25, resolution=32, classes=10)  # no dropout
    split = fashion_mnist.train.take(256)
    x, _ = split.arrays()
    before = np.abs(np.asarray(model(x, training=False)) - np.asarray(model(x, training=True))).max()
    # Statistics pooled over 4 batches: exactly those of all 256 images.
    assert recalibrate_batchnorm(model, split, images=256, batch_size=64) == 52  # every BN layer
    first_conv = keras.Model(model.input, model.get_layer("Conv1").output)
    features = np.asarray(first_conv(x), dtype=np.float64).reshape(-1, 8)
    norm = model.get_layer("bn_Conv1")
    np.testing.assert_allclose(norm.moving_mean.numpy(), features.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), features.var(axis=0), rtol=1e-4)
    # Statistics of this one batch: inference mode now computes what training mode (batch
    # statistics) does, up to float32 rounding through 52 layers.
    recalibrate_batchnorm(model, split, images=256, batch_size=256)
    after = np.abs(np.asarray(model(x, training=False)) - np.asarray(model(x, training=True))).max()
    assert before > 0.05 and after < 0.01


@needs_fashion_mnist
def test_short_fine_tune_then_recalibration_beats_chance_on_the_holdout(fashion_mnist):
    import keras

    keras.utils.set_random_seed(0)
    model = build_model("mobilenet_v1", alpha=0.5, resolution=32, classes=10)
    result = fit(model, fashion_mnist.train.take(4096), steps=40, batch_size=64, lr=2e-3, recalibrate=False)
    assert result.steps == 40 and result.seconds > 0 and 0 <= result.accuracy <= 1
    x, y = fashion_mnist.holdout.arrays()
    stale = evaluate(model, x, y)
    recalibrate_batchnorm(model, fashion_mnist.train.take(4096))
    recalibrated = evaluate(model, x, y)
    # 40 steps leave Keras' moving averages far behind the weights; re-estimated ones don't.
    assert recalibrated > 0.3 and recalibrated > stale + 0.15  # chance: 0.1
    assert evaluate_split(model, fashion_mnist.holdout, batch_size=300) == pytest.approx(recalibrated)


def test_fit_checks_its_arguments(fashion_mnist):
    model = build_model("mobilenet_v1", alpha=0.25, resolution=32, classes=10)
    small = fashion_mnist.train.take(100)
    with pytest.raises(AdapterError, match="exactly one of epochs and steps; received epochs=1, steps=5"):
        fit(model, small, epochs=1, steps=5, batch_size=50)
    with pytest.raises(AdapterError, match=r"at most the number of training images \(100\); received batch_size=128"):
        fit(model, small, steps=5)
    with pytest.raises(AdapterError, match="Unknown optimizer 'rmsprop'"):
        fit(model, small, steps=5, batch_size=50, optimizer="rmsprop")


# --------------------------------------------------------------------------- CLI


@needs_fashion_mnist
def test_train_cli_saves_a_loadable_model_and_record_that_beat_chance(tmp_path, fashion_mnist):
    out = tmp_path / "runs" / "base.keras"
    run = _run_train(
        "--model", "mobilenet_v1", "--alpha", "0.25", "--resolution", "32", "--data", "fashion_mnist",
        "--epochs", "2", "--limit", "4096", "--batch-size", "64", "--lr", "0.01", "--holdout", "1000",
        "--out", str(out),
    )
    assert run.returncode == 0, run.stderr
    assert "epoch 2/2: loss" in run.stdout and "s/epoch" in run.stdout
    record = TrainingRecord.load(record_path(out))
    assert json.loads(record_path(out).read_text())["model"] == "mobilenet_v1"
    assert (record.alpha, record.resolution, record.classes, record.holdout) == (0.25, 32, 10, 1000)
    assert (record.train_images, record.test_images, record.epochs) == (4096, 10000, 2)
    assert record.test_accuracy > 0.45 and record.seconds_per_epoch > 0  # chance is 0.1
    model = load_model(out)
    x, y = fashion_mnist.test.take(2000).arrays()
    assert evaluate(model, x, y) > 0.45
    assert evaluate_split(model, fashion_mnist.test) == pytest.approx(record.test_accuracy)


def test_train_cli_exits_2_with_one_line_on_an_unknown_model(tmp_path):
    run = _run_train("--model", "resnet50", "--out", str(tmp_path / "m.keras"))
    assert run.returncode == 2
    assert "Traceback" not in run.stderr  # TensorFlow's own start-up lines may precede ours
    assert [line for line in run.stderr.splitlines() if "adapter.train" in line] == [
        "python -m adapter.train: error: Unknown model 'resnet50': expected one of ['mobilenet_v1', 'mobilenet_v2']."
    ]
    assert not (tmp_path / "m.keras").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "-1"], "argument --alpha: must be a positive number. Received: '-1'."),
        (["--epochs", "0"], "argument --epochs: must be a positive integer. Received: '0'."),
        (["--holdout", "many"], "argument --holdout: must be an integer ≥ 0. Received: 'many'."),
    ],
)
def test_train_cli_exits_2_on_bad_numbers(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main([*args, "--out", str(tmp_path / "m.keras")])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_train_cli_exits_2_on_missing_data_and_bad_output_name(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PHONEFIT_FASHION_MNIST_DIR", str(tmp_path))
    assert main(["--out", str(tmp_path / "m.keras")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "m.h5")]) == 2
    assert "--out must name a .keras file; received" in capsys.readouterr().err


@needs_fashion_mnist
def test_train_cli_refuses_imagenet_weights_for_a_width_without_them(tmp_path, capsys):
    assert main(["--weights", "imagenet", "--alpha", "0.3", "--out", str(tmp_path / "m.keras")]) == 2
    assert "ImageNet weights for mobilenet_v1 exist for alpha in [0.25, 0.5, 0.75, 1.0]" in capsys.readouterr().err


def test_train_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--alpha", "--resolution", "--data", "--classes", "--weights", "--epochs",
                   "--batch-size", "--lr", "--optimizer", "--holdout", "--limit", "--seed", "--augment", "--out"):
        assert option in text


@pytest.mark.slow
@needs_fashion_mnist
def test_train_cli_trains_mobilenet_v2_above_chance(tmp_path):
    out = tmp_path / "v2.keras"
    run = _run_train(
        "--model", "mobilenet_v2", "--alpha", "0.35", "--epochs", "2", "--limit", "8192",
        "--holdout", "1000", "--out", str(out),
    )
    assert run.returncode == 0, run.stderr
    record = TrainingRecord.load(record_path(out))
    assert record.model == "mobilenet_v2" and record.train_images == 8192
    assert record.test_accuracy > 0.6
