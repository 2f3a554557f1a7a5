import numpy as np
import pytest

from clfsys import config
from clfsys.config import ModelConfig
from clfsys.errors import ConfigError
from clfsys.models import ARCHITECTURES, BACKBONES, build_model


@pytest.mark.parametrize("arch, params, expected", [
    ("mlp", {"units": [350]}, 278_260),
    ("mlp", {"units": [300, 100]}, 266_610),
    ("mlp", {"units": [128]}, 101_770),
    ("cnn", {}, 542_230),
])
def test_tutorial_parameter_counts(arch, params, expected):
    model = build_model(ModelConfig(arch=arch, **params), (28, 28, 1), 10)
    assert model.count_params() == expected


def test_augmentation_adds_no_parameters_and_acts_only_in_training(tmp_path):
    import keras

    plain = build_model(ModelConfig(arch="cnn"), (28, 28, 1), 10)
    augmented = build_model(ModelConfig(arch="cnn", augment=True, zoom=0.3, translate=0.14,
                                        erase=0.5), (28, 28, 1), 10)
    assert {"translate", "zoom", "flip", "erase"} <= {layer.name for layer in augmented.layers}
    assert augmented.count_params() == plain.count_params() == 542_230
    x = np.random.default_rng(0).integers(0, 255, (4, 28, 28, 1), dtype=np.uint8)
    infer = [np.asarray(augmented(x, training=False)) for _ in range(2)]
    assert np.array_equal(infer[0], infer[1])
    trained = [np.asarray(augmented(x, training=True)) for _ in range(3)]
    assert any(not np.allclose(t, infer[0]) for t in trained)
    images = np.full((16, 28, 28, 1), 0.5, dtype=np.float32)  # after rescaling
    for name in ("translate", "erase"):  # each changes training images only
        layer = augmented.get_layer(name)
        assert np.array_equal(np.asarray(layer(images, training=False)), images)
        assert not np.allclose(np.asarray(layer(images + np.eye(28)[None, :, :, None] / 4,
                                                training=True)),
                               images + np.eye(28)[None, :, :, None] / 4)
    augmented.save(tmp_path / "model.keras")  # as a bundle holds it, for labelling and serving
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert np.allclose(np.asarray(loaded(x, training=False)), infer[0], atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_takes_uint8_pixels(arch):
    shape = (32, 32, 3)
    weights = {"weights": "none"} if arch in BACKBONES else {}  # no network here
    model = build_model(ModelConfig(arch=arch, augment=True, **weights), shape, 4)
    assert model.inputs[0].dtype == "uint8"
    out = np.asarray(model(np.zeros((2, *shape), dtype=np.uint8), training=False))
    assert out.shape == (2, 4) and np.allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_cnn_bn_has_batch_norm_and_dropout():
    model = build_model(ModelConfig(arch="cnn_bn"), (28, 28, 1), 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("BatchNormalization") == 2 and kinds.count("Conv2D") == 2
    assert kinds.count("Dropout") == 3


def test_a_model_config_is_complete_once_built():
    mlp = ModelConfig(arch="mlp")
    assert mlp.units == [350] and mlp.dropout == 0.0 and mlp.filters is None
    assert ModelConfig(arch="cnn_bn", filters=[8]).filters == [8]
    assert ModelConfig(arch="mlp").units is not ModelConfig(arch="mlp").units  # not shared
    with pytest.raises(ConfigError, match="model.units is not a parameter of arch 'cnn'"):
        ModelConfig(arch="cnn", units=[10])
    with pytest.raises(ConfigError, match="model.arch must be one of"):
        ModelConfig(arch="resnet9000")
    # Every architecture has a builder and a table of parameters, and the builders' backbones
    # are the config's.
    assert set(ARCHITECTURES) == set(config.ARCH_PARAMS)
    assert set(BACKBONES) == set(config.BACKBONES)
