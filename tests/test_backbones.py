"""keras.applications backbones: weights files, the two-phase schedule, the bundle round trip
and the offline error, on small generated folders (no network: weights none or a local file)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import folder_config, write_folder

from clfsys import bundle
from clfsys.config import ModelConfig
from clfsys.errors import ConfigError
from clfsys.models import BACKBONE_LAYER, build_model

pytestmark = pytest.mark.slow
SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A MobileNetV3Small backbone's weights, saved as another machine would have them."""
    import keras

    keras.utils.set_random_seed(7)
    model = build_model(ModelConfig(arch="mobilenet_v3_small", weights="none"), SHAPE, 3)
    path = tmp_path_factory.mktemp("weights") / "mobilenet.weights.h5"
    model.get_layer(BACKBONE_LAYER).save_weights(path)
    return path, [np.array(w) for w in model.get_layer(BACKBONE_LAYER).get_weights()]


def backbone_config(folder, **overrides):
    """The tests' folder config at 32x32 (the backbones' minimum), CNN parameters unset."""
    return folder_config(folder, **{"data.image_size": [32, 32]}).replace(
        **{"model.filters": None, "model.dense": None, **overrides})


def backbone_weights(model):
    return [np.array(w) for w in model.get_layer(BACKBONE_LAYER).get_weights()]


def test_a_saved_weights_file_loads_into_a_fresh_model(weights_file, tmp_path):
    path, saved = weights_file
    import keras

    keras.utils.set_random_seed(8)
    fresh = build_model(ModelConfig(arch="mobilenet_v3_small", weights="none"), SHAPE, 3)
    assert not all(np.array_equal(a, b) for a, b in zip(backbone_weights(fresh), saved,
                                                         strict=True))
    loaded = build_model(ModelConfig(arch="mobilenet_v3_small", weights=str(path)), SHAPE, 3)
    assert all(np.array_equal(a, b) for a, b in zip(backbone_weights(loaded), saved,
                                                     strict=True))
    with pytest.raises(ConfigError, match=r"model.weights: .*does not fit the ResNet50V2"):
        build_model(ModelConfig(arch="resnet50_v2", weights=str(path)), SHAPE, 3)
    with pytest.raises(ConfigError, match=r"model.weights: .*nope.weights.h5"):
        build_model(ModelConfig(arch="mobilenet_v3_small",
                                weights=str(tmp_path / "nope.weights.h5")), SHAPE, 3)
    with pytest.raises(ConfigError, match="model.weights must be imagenet, none, or a path"):
        ModelConfig(arch="mobilenet_v3_small", weights="imagenet21k")
    with pytest.raises(ConfigError, match="data.image_size must be at least 32x32"):
        build_model(ModelConfig(arch="mobilenet_v3_small", weights="none"), (28, 28, 1), 3)


def test_two_phases_freeze_then_fine_tune_the_top_layers_with_batch_norm_frozen(
        weights_file, tmp_path):
    import keras

    from clfsys.train import train

    path, saved = weights_file
    folder = write_folder(tmp_path / "imgs", per_class=8, size=32)
    seen = []

    class Watch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            backbone = self.model.get_layer(BACKBONE_LAYER)
            seen.append({
                "trainable": [layer.name for layer in backbone.layers
                              if layer.trainable and layer.weights],
                "batch_norm_trainable": any(
                    layer.trainable for layer in backbone.layers
                    if isinstance(layer, keras.layers.BatchNormalization)),
                "head": self.model.get_layer("classes").trainable,
                "lr": float(self.model.optimizer.learning_rate)})

    cfg = backbone_config(folder, **{
        "data.color_mode": "grayscale", "model.arch": "mobilenet_v3_small",
        "model.weights": str(path), "model.fine_tune_layers": 12, "train.epochs": 3,
        "train.warmup_epochs": 1, "train.lr": 0.002, "train.fine_tune_lr": 0.0003,
        "train.early_stopping": False, "train.restore_best_weights": False})
    result = train(cfg, callbacks=[Watch()])
    backbone = result.model.get_layer(BACKBONE_LAYER)
    top = backbone.layers[-12:]
    expected = [layer.name for layer in top if layer.weights
                and not isinstance(layer, keras.layers.BatchNormalization)]
    assert expected  # the top 12 layers hold convolutions
    assert seen[0] == {"trainable": [], "batch_norm_trainable": False, "head": True,
                       "lr": pytest.approx(0.002)}
    for epoch in (1, 2):
        assert seen[epoch] == {"trainable": expected, "batch_norm_trainable": False,
                               "head": True, "lr": pytest.approx(0.0003)}
    # Layers below the top never changed; BatchNorm statistics never moved (inference mode);
    # the fine-tuned layers did change.
    after = {w.path: np.array(w) for w in backbone.weights}
    before = dict(zip((w.path for w in backbone.weights), saved, strict=True))
    tuned = {w.path for layer in top for w in layer.trainable_weights}
    changed = {p for p in after if not np.array_equal(after[p], before[p])}
    assert changed <= tuned and "conv_1/kernel" in changed, sorted(changed)
    assert result.model.input_shape[1:] == (32, 32, 1)  # grayscale repeated inside the model


def test_the_best_epoch_of_the_warm_up_survives_a_worse_fine_tuning(weights_file, tmp_path):
    from test_train_bundle import assert_holds_the_best_epochs_weights

    from clfsys.train import train

    folder = write_folder(tmp_path / "imgs", per_class=8, size=32)
    # A fine-tuning learning rate this large wrecks the backbone: the best epoch is a warm-up's.
    cfg = backbone_config(folder, **{
        "model.arch": "mobilenet_v3_small", "model.weights": str(weights_file[0]),
        "model.fine_tune_layers": 40, "train.epochs": 4, "train.warmup_epochs": 2,
        "train.fine_tune_lr": 5.0, "train.optimizer": "sgd", "train.early_stopping": False,
        "train.monitor": "val_loss"})
    result = train(cfg)
    assert result.epochs_run == 4 and result.best_epoch <= 2, result.history["val_loss"]
    assert_holds_the_best_epochs_weights(result)


def test_backbone_bundle_round_trip_through_predictor_and_labelling(tmp_path):
    from PIL import Image

    from clfsys.label import LabelActor, decode_batch
    from clfsys.predict import Predictor
    from clfsys.train import publish, train

    folder = write_folder(tmp_path / "imgs", per_class=8, size=40)
    cfg = backbone_config(folder, **{"model.arch": "mobilenet_v3_small",
                                     "model.weights": "none", "train.epochs": 1})
    result = train(cfg)
    out = tmp_path / "bundle"
    publish(result, out)
    found = bundle.load(out)
    model = found.load_model()  # safe mode: no Lambda layers, no code in the file
    files = sorted(folder.rglob("*.png"))[:4]
    predictor = Predictor(found)  # (each Predictor loads the model)
    x = np.stack([predictor.decode(f.read_bytes()) for f in files])
    expected = np.asarray(result.model.predict(x, verbose=0))
    assert np.allclose(np.asarray(model.predict(x, verbose=0)), expected, atol=1e-5)
    rows = predictor.rows(x)  # what the endpoint answers
    assert [r["label_index"] for r in rows] == list(expected.argmax(axis=1))
    decoded = decode_batch({"path": np.array([str(f) for f in files])}, found.image_size,
                           found.color_mode, 10**6, found.resize)
    labelled = LabelActor(bundle.portable(found), top_k=1, min_confidence=0.0)(decoded)
    assert list(labelled["label_index"].to_pylist()) == list(expected.argmax(axis=1))
    assert Image.open(files[0]).size == (40, 40)


def test_imagenet_weights_offline_fail_with_one_clear_line(tmp_path):
    folder = write_folder(tmp_path / "imgs", per_class=4, size=32)
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY":
           "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    job = tmp_path / "job.yaml"
    job.write_text(f"data: {{dataset: folder, path: {folder}, image_size: [32, 32]}}\n"
                   "model: {arch: mobilenet_v3_small}\n")
    run = subprocess.run(
        [sys.executable, "-m", "clfsys.cli", "train", "--config", str(job), "--out",
         str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if "model.weights" in line]
    assert len(errors) == 1, run.stderr[-3000:]
    assert "model.weights=imagenet: cannot get the ImageNet weights of MobileNetV3Small" in (
        errors[0]) and "copy ~/.keras/models/ to every node" in errors[0]
    assert "Traceback" not in run.stderr


def test_a_failure_other_than_the_download_is_not_blamed_on_the_weights(monkeypatch):
    """Only a failure inside the weights' download says "cannot get the ImageNet weights";
    anything else in the backbone's builder is raised as itself."""
    import keras

    def broken(**kwargs):
        raise TypeError("a bug in the builder")

    monkeypatch.setattr(keras.applications, "MobileNetV3Small", broken)
    with pytest.raises(TypeError, match="a bug in the builder"):
        build_model(ModelConfig(arch="mobilenet_v3_small", weights="imagenet"), SHAPE, 3)
