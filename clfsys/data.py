"""The configured dataset as uint8 NHWC arrays (dataset.Dataset): Fashion-MNIST (Keras loader),
Kaggle-style CSV, or image folders (folders.py); and a split exported as PNG class folders.

The test split is the dataset's own (Fashion-MNIST's test set, `data.test_path`) or a stratified
`data.test_fraction` of the data; it is never used for training or model selection.
`data.limit` caps the training pool (train + validation) to a stratified, seeded sample of N
examples (dataset.py holds the splitting).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np

from clfsys import dataset, folders, storage
from clfsys.config import DataConfig
from clfsys.dataset import Dataset, Pools
from clfsys.errors import ConfigError, DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def load(cfg: DataConfig, *, test_only: bool = False, cache_root: str | None = None
         ) -> Dataset:
    """Load the configured dataset and split it into train / validation / test. With
    `test_only`, the training and validation splits are empty (folders decode no training
    file). Folders may stream train and validation from the decoded cache (`data.cache`) at
    `data.cache_path`, else `cache_root`, else the user's cache folder."""
    if cfg.dataset == "folder":
        return folders.load(cfg, test_only, cache_root)
    pools = _load_pools(cfg)
    if test_only:
        return dataset.test_split_only(pools.x_test, pools.y_test, pools.class_names,
                                       pools.color_mode, pools.skipped)
    train_idx, val_idx = dataset.validation_split(cfg, pools.y)
    x, y = pools.x, pools.y
    return Dataset(
        x_train=x[train_idx], y_train=y[train_idx], x_val=x[val_idx], y_val=y[val_idx],
        x_test=pools.x_test, y_test=pools.y_test, class_names=pools.class_names,
        color_mode=pools.color_mode, skipped=pools.skipped,
    )


def _load_pools(cfg: DataConfig) -> Pools:
    """The training pool, cut to `data.limit`, and the test split."""
    if cfg.dataset == "folder":
        return folders.pools(cfg)
    pools = _fashion_mnist() if cfg.dataset == "fashion_mnist" else _csv_pools(cfg)
    keep = dataset.training_pool(cfg, pools.y)
    pools.x, pools.y = pools.x[keep], pools.y[keep]
    return pools


# --- Fashion-MNIST ---------------------------------------------------------------------------


def _fashion_mnist() -> Pools:
    import keras

    try:
        (x, y), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as exc:  # network or cache problems surface as many exception types
        raise DataError(
            "cannot load Fashion-MNIST with keras.datasets.fashion_mnist "
            f"({type(exc).__name__}: {exc}); without a network, copy the four *.gz files to "
            "~/.keras/datasets/fashion-mnist/"
        ) from None
    return Pools(x[..., None], y.astype(np.int64), x_test[..., None], y_test.astype(np.int64),
                  list(FASHION_MNIST_CLASSES), "grayscale", [])


# --- CSV (label,pixel1,...,pixelN) -----------------------------------------------------------


def _read_csv(path: str, class_names: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    import io

    import pandas as pd

    file = path  # named in every message below
    try:
        raw = storage.read_bytes(path)
    except storage.StorageError as exc:
        raise DataError(f"CSV file not found: {file}" if exc.not_found else str(exc)) from None
    try:
        frame = pd.read_csv(io.BytesIO(raw))
    except Exception as exc:
        raise DataError(f"{file}: cannot read CSV: {exc}") from None
    if frame.shape[1] < 2 or len(frame) == 0:
        raise DataError(f"{file}: expected a header and rows of label,pixel1,...,pixelN")
    label_col = "label" if "label" in frame.columns else frame.columns[0]
    pixels = frame.drop(columns=[label_col])
    side = math.isqrt(pixels.shape[1])
    if side * side != pixels.shape[1]:
        raise DataError(f"{file}: {pixels.shape[1]} pixel columns do not form a square image")
    bad_cols = [c for c in pixels.columns if not pd.api.types.is_numeric_dtype(pixels[c])]
    if bad_cols:
        raise DataError(f"{file}: column {bad_cols[0]!r} is not numeric")
    values = pixels.to_numpy()
    if np.isnan(values).any() or values.min() < 0 or values.max() > 255:
        raise DataError(f"{file}: pixel values must be numbers in 0..255")
    labels = frame[label_col]
    if not pd.api.types.is_integer_dtype(labels) or labels.min() < 0:
        raise DataError(f"{file}: column {label_col!r} must hold integer labels >= 0")
    y = labels.to_numpy().astype(np.int64)
    if class_names is not None and y.max() >= len(class_names):
        raise ConfigError(f"data.class_names has {len(class_names)} names but {file} has "
                          f"label {int(y.max())}")
    x = values.astype(np.uint8).reshape(len(frame), side, side, 1)
    return x, y


def _csv_pools(cfg: DataConfig) -> Pools:
    x, y = _read_csv(cfg.path, cfg.class_names)
    if cfg.test_path:
        x_test, y_test = _read_csv(cfg.test_path, cfg.class_names)
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{cfg.test_path}: images are {x_test.shape[1]}x{x_test.shape[2]}, "
                            f"the training CSV's are {x.shape[1]}x{x.shape[2]}")
    else:
        keep, held = dataset.stratified_split(y, cfg.test_fraction, cfg.seed + 1)
        x, y, x_test, y_test = x[keep], y[keep], x[held], y[held]
    n_classes = int(max(y.max(), y_test.max() if len(y_test) else 0)) + 1
    names = list(cfg.class_names) if cfg.class_names else [str(i) for i in range(n_classes)]
    return Pools(x, y, x_test, y_test, names, "grayscale", [])


# --- Export as PNG class folders -------------------------------------------------------------


def safe_folder_names(class_names: list[str]) -> list[str]:
    """Filesystem-safe, unique folder names: 'T-shirt/top' -> 'T-shirt_top'."""
    result: list[str] = []
    for i, name in enumerate(class_names):
        safe = re.sub(r"[^\w.-]+", "_", name).strip("._") or f"class_{i}"
        while safe in result:
            safe = f"{safe}_{i}"
        result.append(safe)
    return result


def export_images(cfg: DataConfig, split: str, out: str | Path, limit: int | None = None) -> int:
    """Write one split ('train' = the whole training pool, or 'test') as <out>/<class>/<n>.png."""
    from PIL import Image

    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output folder is not empty: {out}")
    pools = _load_pools(cfg)
    x, y = (pools.x, pools.y) if split == "train" else (pools.x_test, pools.y_test)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    folders = safe_folder_names(pools.class_names)
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(x))))
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(pixels).save(out / folders[label] / f"{split}_{i:0{width}d}.png")
        if (i + 1) % 10000 == 0:
            print(f"exported {i + 1}/{len(x)} images", file=sys.stderr)
    return len(x)
