"""Architecture registry: name -> builder(model_cfg, input_shape, num_classes) -> keras.Model.

Every model takes raw uint8 pixels: rescaling (or a pretrained backbone's own preprocessing) and
the optional augmentation layers (random shift, zoom, horizontal flip, erasing; active only in
training) live
inside the model. Adding an architecture is one builder function, one line in ARCHITECTURES and
its parameters' defaults in config.ARCH_PARAMS (a ModelConfig arrives complete: builders only
read its fields).

Pretrained backbones (BACKBONES) come from keras.applications without their top: grayscale is
repeated to 3 channels inside the model, and a new head (dropout, softmax) follows the pooled
features. `model.weights` is imagenet (Keras downloads them, or reads ~/.keras/models/), none
(from scratch), or a .weights.h5 file at a path or URI; train.py freezes and unfreezes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clfsys.config import ModelConfig
from clfsys.errors import ConfigError, first_line

BACKBONES = {
    "mobilenet_v3_small": ("MobileNetV3Small", True),
    "mobilenet_v3_large": ("MobileNetV3Large", True),
    "efficientnet_v2_b0": ("EfficientNetV2B0", True),
    "resnet50_v2": ("ResNet50V2", False),
}
"""arch -> (keras.applications model, whether it preprocesses 0..255 pixels itself); ResNet50V2
expects pixels in [-1, 1], which a Rescaling layer in front of it does."""
BACKBONE_LAYER = "backbone"
MIN_BACKBONE_SIDE = 32


def _inputs(cfg: ModelConfig, input_shape: tuple[int, int, int], scale: float = 1.0 / 255,
            offset: float = 0.0) -> tuple[Any, Any]:
    import keras

    inputs = keras.Input(shape=input_shape, dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(scale, offset, name="rescale")(inputs)
    if cfg.augment:
        if cfg.translate > 0:
            x = keras.layers.RandomTranslation(cfg.translate, cfg.translate, fill_mode="constant",
                                               name="translate")(x)
        if cfg.zoom > 0:
            x = keras.layers.RandomZoom(cfg.zoom, fill_mode="constant", name="zoom")(x)
        if cfg.flip:
            x = keras.layers.RandomFlip("horizontal", name="flip")(x)
        if cfg.erase > 0:
            x = keras.layers.RandomErasing(factor=(cfg.erase, cfg.erase), name="erase",
                                           value_range=(offset, offset + 255 * scale))(x)
    return inputs, x


def _head(x: Any, num_classes: int) -> Any:
    import keras

    return keras.layers.Dense(num_classes, activation="softmax", name="classes")(x)


def _dense_head(cfg: ModelConfig, x: Any, num_classes: int) -> Any:
    """Flatten -> Dense(cfg.dense) -> Dropout(cfg.dense_dropout) -> Dense(classes)."""
    import keras

    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(cfg.dense, activation="relu")(x)
    x = keras.layers.Dropout(cfg.dense_dropout)(x)
    return _head(x, num_classes)


def build_mlp(cfg: ModelConfig, input_shape, num_classes: int):
    """Flatten -> Dense(units...) [-> Dropout] -> Dense(classes)."""
    import keras

    inputs, x = _inputs(cfg, input_shape)
    x = keras.layers.Flatten()(x)
    for units in cfg.units:
        x = keras.layers.Dense(units, activation="relu")(x)
        if cfg.dropout:
            x = keras.layers.Dropout(cfg.dropout)(x)
    return keras.Model(inputs, _head(x, num_classes), name="mlp")


def _conv_net(cfg: ModelConfig, input_shape, num_classes: int, padding: str, name: str):
    import keras

    inputs, x = _inputs(cfg, input_shape)
    for filters in cfg.filters:
        x = keras.layers.Conv2D(filters, cfg.kernel_size, padding=padding, activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
        if cfg.dropout:
            x = keras.layers.Dropout(cfg.dropout)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(cfg.dense, activation="relu")(x)
    if cfg.dense_dropout:
        x = keras.layers.Dropout(cfg.dense_dropout)(x)
    return keras.Model(inputs, _head(x, num_classes), name=name)


def build_cnn(cfg: ModelConfig, input_shape, num_classes: int):
    """(Conv2D valid -> MaxPool) per filter count -> Flatten -> Dense -> Dense(classes)."""
    return _conv_net(cfg, input_shape, num_classes, padding="valid", name="cnn")


def build_cnn_bn(cfg: ModelConfig, input_shape, num_classes: int):
    """(BatchNorm -> Conv2D -> MaxPool -> Dropout) per filter count -> Dense -> Dropout."""
    import keras

    inputs, x = _inputs(cfg, input_shape)
    for filters in cfg.filters:
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Conv2D(filters, cfg.kernel_size, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Dropout(cfg.dropout)(x)
    return keras.Model(inputs, _dense_head(cfg, x, num_classes), name="cnn_bn")


def build_cnn_vgg(cfg: ModelConfig, input_shape, num_classes: int):
    """VGG blocks: (Conv2D -> BatchNorm -> ReLU, twice -> MaxPool -> Dropout) per filter count
    -> Dense -> Dropout -> Dense(classes). Deeper than cnn_bn at about twice its compute."""
    import keras

    inputs, x = _inputs(cfg, input_shape)
    for filters in cfg.filters:
        for _ in range(2):
            x = keras.layers.Conv2D(filters, cfg.kernel_size, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Dropout(cfg.dropout)(x)
    return keras.Model(inputs, _dense_head(cfg, x, num_classes), name="cnn_vgg")


def build_cnn_wide(cfg: ModelConfig, input_shape, num_classes: int):
    """For larger RGB images: (Conv 5x5 same -> MaxPool -> Dropout) per filter count ->
    Dense(256) -> Dropout -> Dense(classes)."""
    return _conv_net(cfg, input_shape, num_classes, padding="same", name="cnn_wide")


def _backbone_builder(arch: str) -> Callable[..., Any]:
    application, preprocesses = BACKBONES[arch]

    def build(cfg: ModelConfig, input_shape, num_classes: int):
        import keras

        height, width, channels = input_shape
        if min(height, width) < MIN_BACKBONE_SIDE:
            raise ConfigError(f"data.image_size must be at least {MIN_BACKBONE_SIDE}x"
                              f"{MIN_BACKBONE_SIDE} for model.arch {arch!r}, got "
                              f"{height}x{width}")
        inputs, x = (_inputs(cfg, input_shape, 1.0) if preprocesses
                     else _inputs(cfg, input_shape, 1.0 / 127.5, -1.0))
        if channels == 1:
            x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
        x = _backbone(application, cfg.weights, (height, width, 3), preprocesses)(x)
        x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
        return keras.Model(inputs, _head(x, num_classes), name=arch)

    build.__doc__ = (f"keras.applications.{application} (no top, average pooling) -> Dropout "
                     "-> Dense(classes).")
    return build


def _backbone(application: str, weights: str, shape: tuple[int, int, int], preprocesses: bool):
    import keras

    make = getattr(keras.applications, application)
    kwargs = {"include_preprocessing": True} if preprocesses else {}
    try:
        backbone = make(include_top=False, weights="imagenet" if weights == "imagenet" else None,
                        input_shape=shape, pooling="avg", **kwargs)
    except Exception as exc:  # the download fails in many ways (DNS, proxy, HTTP, disk)
        if weights != "imagenet" or not _raised_in(exc, "get_file"):
            raise
        raise ConfigError(
            f"model.weights=imagenet: cannot get the ImageNet weights of {application} "
            f"({first_line(exc)}); on a cluster without internet, run `python -c "
            f"\"import keras; keras.applications.{application}(include_top=False)\"` where "
            "there is, copy ~/.keras/models/ to every node, or set model.weights to a "
            ".weights.h5 file (path or URI)") from None
    backbone.name = BACKBONE_LAYER  # (EfficientNetV2 reads its own name= to pick its blocks)
    if weights not in ("imagenet", "none"):
        _load_weights(backbone, weights, application)
    return backbone


def _load_weights(backbone, location: str, application: str) -> None:
    import tempfile
    from pathlib import Path

    from clfsys import storage

    try:
        data = storage.read_bytes(storage.normalize(location))
    except storage.StorageError as exc:
        raise ConfigError(f"model.weights: {exc}") from None
    suffix = ".weights.h5" if location.endswith(".weights.h5") else ".h5"
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / f"backbone{suffix}"
        file.write_bytes(data)
        try:
            backbone.load_weights(file)
        except Exception as exc:
            raise ConfigError(f"model.weights: {location} does not fit the {application} "
                              f"backbone ({first_line(exc)})") from None


def _raised_in(exc: BaseException, function: str) -> bool:
    """Whether `function` (e.g. keras.utils.get_file, the weights' download) is on the stack
    that raised `exc`."""
    import traceback

    return any(frame.name == function for frame in traceback.extract_tb(exc.__traceback__))


ARCHITECTURES: dict[str, Callable[..., Any]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "cnn_bn": build_cnn_bn,
    "cnn_vgg": build_cnn_vgg,
    "cnn_wide": build_cnn_wide,
    **{arch: _backbone_builder(arch) for arch in BACKBONES},
}
"""arch -> builder(model_cfg, input_shape, num_classes); the same names as config.ARCH_PARAMS."""


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int):
    """Build the configured architecture (not compiled)."""
    return ARCHITECTURES[cfg.arch](cfg, tuple(input_shape), num_classes)
