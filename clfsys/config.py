"""Typed configuration: one YAML file plus `--set key=value` overrides.

Every section is a frozen dataclass whose fields are `options.option(default, help)`. Unknown
keys are rejected and every validation error names the dotted key the user typed, e.g.
``train.lr must be > 0, got -1``.
No TensorFlow or Ray import here.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clfsys.errors import ConfigError, first_line
from clfsys.options import build, check, option
from clfsys.tune_config import TuneConfig

DATASETS = ("fashion_mnist", "csv", "folder")
COLOR_MODES = ("grayscale", "rgb")
CACHE_MODES = ("auto", "memory", "disk")
RESIZE_MODES = ("stretch", "pad", "crop")
"""stretch: resize to the input size, aspect ratio lost; pad: fit inside it, aspect ratio kept,
centred on black borders; crop: fill it, aspect ratio kept, the centre cropped."""
OPTIMIZERS = ("sgd", "adam", "adamw")
MONITORS = ("val_loss", "val_accuracy")
LR_DECAYS = ("none", "cosine")

BACKBONES = ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_v2_b0", "resnet50_v2")
"""The keras.applications backbones (models.BACKBONES says how each is built)."""
_BACKBONE_PARAMS = {"weights": "imagenet", "dropout": 0.2, "fine_tune_layers": 30}
ARCH_PARAMS: dict[str, dict[str, Any]] = {
    "mlp": {"units": [350], "dropout": 0.0},
    "cnn": {"filters": [32], "kernel_size": 3, "dense": 100, "dropout": 0.0,
            "dense_dropout": 0.0},
    "cnn_bn": {"filters": [32, 32], "kernel_size": 3, "dense": 128, "dropout": 0.25,
               "dense_dropout": 0.5},
    "cnn_vgg": {"filters": [32, 64], "kernel_size": 3, "dense": 256, "dropout": 0.25,
                "dense_dropout": 0.5},
    "cnn_wide": {"filters": [32, 64], "kernel_size": 5, "dense": 256, "dropout": 0.25,
                 "dense_dropout": 0.5},
    **{arch: _BACKBONE_PARAMS for arch in BACKBONES},
}
"""Each architecture's parameters (fields of ModelConfig) with their defaults: a ModelConfig
has exactly these set, the rest None. An architecture is this line plus its builder in
models.ARCHITECTURES; a new parameter is a field of ModelConfig plus its default here."""
ARCH_PARAM_NAMES = tuple(dict.fromkeys(name for p in ARCH_PARAMS.values() for name in p))


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split."""

    dataset: str = option("fashion_mnist", "fashion_mnist (Keras loader), csv "
                                           "(label,pixel1..pixelN) or folder (a subfolder a "
                                           "class).")
    path: str | None = option(None, "Training CSV file or image folder (csv/folder only).")
    test_path: str | None = option(None, "Held-out test CSV or folder; else a stratified "
                                         "`test_fraction` of `path` is held out.")
    class_names: list[str] | None = option(None, "Class names for CSV labels 0..N-1 (default: the "
                                                 "label numbers).")
    image_size: list[int] = option([64, 64], "Folder images are resized to [height, width].")
    color_mode: str = option("rgb", "Folder images are converted to rgb or grayscale.")
    resize: str = option("stretch", "How images reach image_size: stretch, or keep the aspect "
                                    "ratio with pad (black borders) or crop (the centre). The "
                                    "bundle records it, so labelling and serving do the same.")
    val_fraction: float = option(0.1, "Stratified fraction of the training data used for "
                                      "validation (model selection).")
    test_fraction: float = option(0.2, "Stratified fraction held out as the test split when there "
                                       "is no `test_path`.")
    limit: int | None = option(None, "Train on a stratified, seeded sample of N examples of the "
                                     "training pool (quick runs); folders decode only the sampled "
                                     "files.")
    cache: str = option("auto", "Folders: memory (decode into arrays), disk (decode once into "
                                "shards at cache_path and stream them), or auto: disk when the "
                                "decoded training and validation splits exceed memory_budget_mb.")
    memory_budget_mb: int = option(2048, "What the data pipeline may hold: the in-memory limit of "
                                         "`auto`; a streamed shard is at most an eighth of it.")
    cache_path: str | None = option(None, "Folders, disk cache: where decoded shards live (local "
                                          "path or URI; shared storage on a cluster). Unset: "
                                          "<search storage>/decoded for `clfsys tune`, "
                                          "~/.cache/clfsys/decoded for `clfsys train`.")
    skip_corrupt: bool = option(False, "Folders: skip undecodable images and count them, instead "
                                       "of stopping with the file's name.")
    seed: int = option(0, "Seed of the stratified splits.")

    def __post_init__(self) -> None:
        check(self.dataset in DATASETS, "data.dataset", f"must be one of {list(DATASETS)}",
              self.dataset)
        if self.dataset in ("csv", "folder"):
            check(bool(self.path), "data.path", f"is required for dataset {self.dataset!r}",
                  self.path)
        check(len(self.image_size) == 2 and all(s > 0 for s in self.image_size),
              "data.image_size", "must be [height, width] with positive sizes", self.image_size)
        check(self.color_mode in COLOR_MODES, "data.color_mode",
              f"must be one of {list(COLOR_MODES)}", self.color_mode)
        check(self.resize in RESIZE_MODES, "data.resize", f"must be one of {list(RESIZE_MODES)}",
              self.resize)
        check(0 < self.val_fraction < 1, "data.val_fraction", "must be in (0, 1)",
              self.val_fraction)
        check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)",
              self.test_fraction)
        if self.limit is not None:
            check(self.limit > 0, "data.limit", "must be > 0", self.limit)
        check(self.cache in CACHE_MODES, "data.cache", f"must be one of {list(CACHE_MODES)}",
              self.cache)
        check(self.memory_budget_mb > 0, "data.memory_budget_mb", "must be > 0",
              self.memory_budget_mb)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture and its parameters, complete once built: the parameters `arch` takes
    (ARCH_PARAMS) that were not given hold its defaults, and the others are None."""

    arch: str = option("cnn", "Registered architecture: mlp, cnn, cnn_bn, cnn_vgg, cnn_wide, or a "
                              "keras.applications backbone: mobilenet_v3_small, "
                              "mobilenet_v3_large, efficientnet_v2_b0, resnet50_v2.")
    units: list[int] | None = option(None, "mlp: hidden layer widths.")
    filters: list[int] | None = option(None, "CNNs: filters of each conv block.")
    kernel_size: int | None = option(None, "CNNs: conv kernel size.")
    dense: int | None = option(None, "CNNs: width of the dense layer before the classifier.")
    dropout: float | None = option(None, "Dropout after each hidden layer (mlp) or conv block "
                                         "(CNNs).")
    dense_dropout: float | None = option(None, "CNNs with a dropout head: dropout after the dense "
                                               "layer.")
    weights: str | None = option(None, "Pretrained backbones: imagenet, none (from scratch), or a "
                                       "path or URI to a .weights.h5 file of the backbone.")
    fine_tune_layers: int | None = option(None, "Pretrained backbones: after train.warmup_epochs, "
                                                "the top N layers of the backbone train (BatchNorm"
                                                " layers stay frozen, in inference mode).")
    augment: bool = option(False, "Random shift, zoom, horizontal flip and erasing (each as set "
                                  "below), active in training only.")
    zoom: float = option(0.1, "Random zoom factor when augment is on.")
    flip: bool = option(True, "Random horizontal flip when augment is on.")
    translate: float = option(0.0, "Random shift by up to this fraction of the height and width "
                                   "when augment is on, the gap filled with zeros (a random crop "
                                   "after 4-pixel padding of a 28x28 image is 0.14).")
    erase: float = option(0.0, "Random erasing when augment is on: the chance that a training "
                               "image gets one random rectangle filled with noise.")

    def __post_init__(self) -> None:
        check(self.arch in ARCH_PARAMS, "model.arch", f"must be one of {sorted(ARCH_PARAMS)}",
              self.arch)
        takes = ARCH_PARAMS[self.arch]
        for name in ARCH_PARAM_NAMES:
            if name in takes and getattr(self, name) is None:
                object.__setattr__(self, name, copy.deepcopy(takes[name]))
            elif name not in takes and getattr(self, name) is not None:
                raise ConfigError(f"model.{name} is not a parameter of arch {self.arch!r} "
                                  f"(it takes {', '.join(sorted(takes))})")
        for key in ("units", "filters"):
            value = getattr(self, key)
            if value is not None:
                check(len(value) > 0 and all(v > 0 for v in value), f"model.{key}",
                      "must be a non-empty list of positive integers", value)
        for key in ("kernel_size", "dense"):
            value = getattr(self, key)
            if value is not None:
                check(value > 0, f"model.{key}", "must be > 0", value)
        for key in ("dropout", "dense_dropout"):
            value = getattr(self, key)
            if value is not None:
                check(0 <= value < 1, f"model.{key}", "must be in [0, 1)", value)
        check(0 <= self.zoom < 1, "model.zoom", "must be in [0, 1)", self.zoom)
        check(0 <= self.translate < 1, "model.translate", "must be in [0, 1)", self.translate)
        check(0 <= self.erase <= 1, "model.erase", "must be in [0, 1]", self.erase)
        if self.weights is not None:
            check(self.weights in ("imagenet", "none") or str(self.weights).endswith(".h5"),
                  "model.weights", "must be imagenet, none, or a path or URI to a .weights.h5 "
                  "file", self.weights)
        if self.fine_tune_layers is not None:
            check(self.fine_tune_layers >= 0, "model.fine_tune_layers", "must be >= 0",
                  self.fine_tune_layers)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, early stopping and logging."""

    optimizer: str = option("adam", "sgd, adam or adamw.")
    lr: float = option(1e-3, "Learning rate.")
    momentum: float = option(0.0, "SGD momentum.")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    batch_size: int = option(32, "Mini-batch size.")
    epochs: int = option(20, "Maximum epochs.")
    early_stopping: bool = option(True, "Stop when `monitor` has not improved for `patience` "
                                        "epochs.")
    monitor: str = option("val_loss", "val_loss or val_accuracy: drives early stopping and the "
                                      "best-model checkpoint.")
    patience: int = option(3, "Epochs without improvement before stopping.")
    restore_best_weights: bool = option(True, "Keep the weights of the best epoch, not the last.")
    lr_plateau_patience: int | None = option(None, "Multiply the learning rate by "
                                                   "`lr_plateau_factor` after this many epochs "
                                                   "without improvement of `monitor` (Keras "
                                                   "ReduceLROnPlateau); unset: constant learning "
                                                   "rate.")
    lr_plateau_factor: float = option(0.3, "Factor of the learning-rate reduction on a plateau.")
    lr_decay: str = option("none", "none, or cosine: the learning rate follows a half cosine from "
                                   "`lr` down to 1% of it over `epochs` (each phase of a "
                                   "pretrained backbone its own), set at every epoch's start from "
                                   "the epoch number alone, so a trial paused and resumed at an "
                                   "ASHA rung continues the same curve. Excludes "
                                   "`lr_plateau_patience`.")
    warmup_epochs: int = option(3, "Pretrained backbones: epochs with the backbone frozen (only "
                                   "the new head trains) before its top model.fine_tune_layers "
                                   "layers train too.")
    fine_tune_lr: float | None = option(None, "Pretrained backbones: learning rate once the "
                                              "backbone trains; unset: lr / 10.")
    tensorboard: bool = option(True, "Write TensorBoard logs under <out>/logs.")
    seed: int = option(42, "Global seed (Python, NumPy, TensorFlow).")
    verbose: int = option(2, "Keras progress output: 0 silent, 1 progress bar, 2 one line per "
                             "epoch.")

    def __post_init__(self) -> None:
        check(self.optimizer in OPTIMIZERS, "train.optimizer",
              f"must be one of {list(OPTIMIZERS)}", self.optimizer)
        check(self.lr > 0, "train.lr", "must be > 0", self.lr)
        check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)", self.momentum)
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        check(self.batch_size > 0, "train.batch_size", "must be > 0", self.batch_size)
        check(self.epochs > 0, "train.epochs", "must be > 0", self.epochs)
        check(self.monitor in MONITORS, "train.monitor", f"must be one of {list(MONITORS)}",
              self.monitor)
        check(self.patience >= 0, "train.patience", "must be >= 0", self.patience)
        if self.lr_plateau_patience is not None:
            check(self.lr_plateau_patience >= 1, "train.lr_plateau_patience", "must be >= 1",
                  self.lr_plateau_patience)
        check(0 < self.lr_plateau_factor < 1, "train.lr_plateau_factor", "must be in (0, 1)",
              self.lr_plateau_factor)
        check(self.lr_decay in LR_DECAYS, "train.lr_decay", f"must be one of {list(LR_DECAYS)}",
              self.lr_decay)
        check(self.lr_decay == "none" or self.lr_plateau_patience is None, "train.lr_decay",
              "cosine decay and the plateau schedule (train.lr_plateau_patience) exclude each "
              "other: unset one", self.lr_decay)
        check(self.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0",
              self.warmup_epochs)
        if self.fine_tune_lr is not None:
            check(self.fine_tune_lr > 0, "train.fine_tune_lr", "must be > 0", self.fine_tune_lr)
        check(self.verbose in (0, 1, 2), "train.verbose", "must be 0, 1 or 2", self.verbose)


@dataclass(frozen=True)
class Config:
    """The whole job: one object drives every command."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted-key overrides applied, e.g. replace(**{"train.lr": 0.01}). The
        model's parameters belong to its arch: overriding `model.arch` with another one gives
        that arch's defaults for every parameter the overrides do not set."""
        raw = self.to_dict()
        if overrides.get("model.arch", self.model.arch) != self.model.arch:
            raw["model"].update(dict.fromkeys(ARCH_PARAM_NAMES))
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return from_dict(raw)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be dotted, like train.lr")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.01` -> ("train.lr", 0.01); the value is read as YAML (lists, numbers, null)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {value!r}: {exc}") from None
    return key.strip(), parsed


def from_dict(raw: dict[str, Any] | None) -> Config:
    return build(Config, raw, "", "config key")


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                values: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or the defaults without one) and apply `key=value` overrides, then
    `values` (dotted key -> value, as given: a command's own flags)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {first_line(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections")
    for key, value in [*map(parse_override, overrides), *(values or {}).items()]:
        _set_dotted(raw, key, value)
    return from_dict(raw)
