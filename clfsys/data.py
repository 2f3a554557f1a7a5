"""Datasets as uint8 NHWC arrays: Fashion-MNIST (Keras loader), Kaggle-style CSV, image folders.

Splits are stratified and seeded. The test split is the dataset's own (Fashion-MNIST's test set,
`data.test_path`) or a stratified `data.test_fraction` of the data; it is never used for training
or model selection. `data.limit` caps the training pool (train + validation) to a stratified,
seeded sample of N examples. Folders are listed and split by file first, so only the files of the
splits asked for are decoded.
"""

from __future__ import annotations

import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clfsys import cache, images, storage
from clfsys.config import DataConfig
from clfsys.errors import ConfigError, DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


@dataclass
class Dataset:
    """Train / validation / test arrays (uint8, NHWC) with their class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    color_mode: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of images skipped because they could not be decoded."""
    train_shards: cache.Shards | None = None
    """Set when the training split streams from the decoded cache (x_train is then empty)."""
    val_shards: cache.Shards | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]

    def summary(self) -> str:
        h, w, c = self.input_shape
        text = (f"{len(self.x_train)} train / {len(self.x_val)} val / {len(self.x_test)} test "
                f"images of {h}x{w}x{c}, {len(self.class_names)} classes")
        if self.skipped:
            text += f", {len(self.skipped)} undecodable files skipped"
        if self.train_shards is not None:
            text += (f"; train and validation streamed from "
                     f"{len(self.train_shards.counts) + len(self.val_shards.counts)} decoded "
                     f"shards ({self.train_shards.location}, ...)")
        return text

    @property
    def train_examples(self) -> int:
        return len(self.y_train)


@dataclass
class _Pools:
    """A dataset before the validation split: the training pool and the held-out test split."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    color_mode: str
    skipped: list[tuple[str, str]]


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held_out) with `fraction` of every class held out.

    Every class with at least two examples keeps at least one and gives at least one.
    """
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n = 0
        if len(idx) >= 2:
            n = min(max(int(round(len(idx) * fraction)), 1), len(idx) - 1)
        held.append(idx[:n])
    held_idx = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    kept_idx = np.setdiff1d(np.arange(len(y)), held_idx)
    return kept_idx, held_idx


def stratified_sample(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of `n` of `y`'s examples, every class in proportion
    (largest remainders), and every class at least once when `n` allows."""
    if n >= len(y):
        return np.arange(len(y))
    labels, counts = np.unique(y, return_counts=True)
    exact = counts * n / len(y)
    quota = np.floor(exact).astype(np.int64)
    if n >= len(labels):
        quota = np.maximum(quota, 1)
    while quota.sum() < n:
        room = np.where(quota < counts, exact - quota, -np.inf)
        quota[int(np.argmax(room))] += 1
    while quota.sum() > n:
        spare = np.where(quota > 1, exact - quota, np.inf)
        quota[int(np.argmin(spare))] -= 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == label))[:k]
              for label, k in zip(labels, quota, strict=True)]
    return np.sort(np.concatenate(picked))


def _limit(cfg: DataConfig, y: np.ndarray) -> np.ndarray:
    """Indices of the training pool that `data.limit` keeps."""
    return (np.arange(len(y)) if cfg.limit is None
            else stratified_sample(y, cfg.limit, cfg.seed + 2))


def load(cfg: DataConfig, *, test_only: bool = False, cache_root: str | None = None
         ) -> Dataset:
    """Load the configured dataset and split it into train / validation / test. With
    `test_only`, the training and validation splits are empty (folders decode no training
    file). Folders may stream train and validation from the decoded cache (`data.cache`) at
    `data.cache_path`, else `cache_root`, else the user's cache folder."""
    if cfg.dataset == "folder":
        return _load_folder(cfg, test_only, cache_root)
    pools = _load_pools(cfg)
    if test_only:
        return _test_split_only(pools.x_test, pools.y_test, pools.class_names, pools.color_mode,
                                pools.skipped)
    train_idx, val_idx = _validation_split(cfg, pools.y)
    x, y = pools.x, pools.y
    return Dataset(
        x_train=x[train_idx], y_train=y[train_idx], x_val=x[val_idx], y_val=y[val_idx],
        x_test=pools.x_test, y_test=pools.y_test, class_names=pools.class_names,
        color_mode=pools.color_mode, skipped=pools.skipped,
    )


def _test_split_only(x_test, y_test, names, color_mode, skipped) -> Dataset:
    empty_x, empty_y = x_test[:0], y_test[:0]
    return Dataset(empty_x, empty_y, empty_x, empty_y, x_test, y_test, names, color_mode,
                   skipped)


def _validation_split(cfg: DataConfig, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(np.unique(y)) < 2:
        raise DataError(f"{_describe(cfg)}: the training data has fewer than 2 classes")
    train_idx, val_idx = stratified_split(y, cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0:
        raise DataError(f"{_describe(cfg)}: too few examples for a validation split "
                        f"({len(y)} examples)")
    return train_idx, val_idx


def _describe(cfg: DataConfig) -> str:
    return cfg.path if cfg.path else cfg.dataset


def _load_pools(cfg: DataConfig) -> _Pools:
    """The training pool, cut to `data.limit`, and the test split."""
    if cfg.dataset == "folder":
        return _folder_pools(cfg)
    pools = _fashion_mnist() if cfg.dataset == "fashion_mnist" else _csv_pools(cfg)
    keep = _limit(cfg, pools.y)
    pools.x, pools.y = pools.x[keep], pools.y[keep]
    return pools


# --- Fashion-MNIST ---------------------------------------------------------------------------


def _fashion_mnist() -> _Pools:
    import keras

    try:
        (x, y), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as exc:  # network or cache problems surface as many exception types
        raise DataError(
            "cannot load Fashion-MNIST with keras.datasets.fashion_mnist "
            f"({type(exc).__name__}: {exc}); without a network, copy the four *.gz files to "
            "~/.keras/datasets/fashion-mnist/"
        ) from None
    return _Pools(x[..., None], y.astype(np.int64), x_test[..., None], y_test.astype(np.int64),
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


def _csv_pools(cfg: DataConfig) -> _Pools:
    x, y = _read_csv(cfg.path, cfg.class_names)
    if cfg.test_path:
        x_test, y_test = _read_csv(cfg.test_path, cfg.class_names)
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{cfg.test_path}: images are {x_test.shape[1]}x{x_test.shape[2]}, "
                            f"the training CSV's are {x.shape[1]}x{x.shape[2]}")
    else:
        keep, held = stratified_split(y, cfg.test_fraction, cfg.seed + 1)
        x, y, x_test, y_test = x[keep], y[keep], x[held], y[held]
    n_classes = int(max(y.max(), y_test.max() if len(y_test) else 0)) + 1
    names = list(cfg.class_names) if cfg.class_names else [str(i) for i in range(n_classes)]
    return _Pools(x, y, x_test, y_test, names, "grayscale", [])


# --- Image folders (one subfolder per class) -------------------------------------------------


def _class_folders(root: str) -> list[str]:
    if not storage.is_dir(root):
        raise DataError(f"image folder not found: {root}")
    folders = [f for f in storage.list_dirs(root) if not storage.name(f).startswith(".")]
    if len(folders) < 2:
        raise DataError(f"{root}: needs at least 2 class subfolders, found {len(folders)}")
    return folders


def _image_files(folder: str) -> list[str]:
    return [f for f in storage.list_files(folder) if images.is_image_path(f)]


def _decode_file(path: str, size: tuple[int, int], cfg: DataConfig) -> np.ndarray:
    return images.decode(storage.retrying(lambda: storage.read_bytes(path)), size,
                         cfg.color_mode, resize=cfg.resize)


def _list_folder(root: str, class_names: list[str] | None
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(files, labels, class names) of a folder of class subfolders, in class order."""
    folders = _class_folders(root)
    names = [storage.name(f) for f in folders]
    if class_names is not None:
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise DataError(f"{root}: class folder {unknown[0]!r} is not a training class "
                            f"({', '.join(class_names)})")
    files: list[str] = []
    labels: list[int] = []
    for folder, folder_name in zip(folders, names, strict=True):
        found = _image_files(folder)
        if not found:
            raise DataError(f"class folder has no images: {folder}")
        files += found
        labels += [(class_names or names).index(folder_name)] * len(found)
    return np.asarray(files, dtype=object), np.asarray(labels, dtype=np.int64), \
        class_names or names


def _decode_files(
    files: np.ndarray, y: np.ndarray, cfg: DataConfig, root: str
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode `files` (4 threads); undecodable ones stop the load naming the file, or with
    data.skip_corrupt are skipped and listed."""
    size = (cfg.image_size[0], cfg.image_size[1])
    shape = (*size, 1 if cfg.color_mode == "grayscale" else 3)
    x = np.zeros((len(files), *shape), dtype=np.uint8)
    ok = np.ones(len(files), dtype=bool)
    skipped: list[tuple[str, str]] = []

    def work(i: int) -> tuple[int, images.ImageError | None]:
        try:
            x[i] = _decode_file(files[i], size, cfg)
            return i, None
        except images.ImageError as exc:
            return i, exc

    show_progress = len(files) >= 2000
    with ThreadPoolExecutor(max_workers=4) as pool:
        for done, (i, err) in enumerate(pool.map(work, range(len(files))), start=1):
            if err is not None:
                if not cfg.skip_corrupt:
                    raise DataError(f"{files[i]}: cannot decode image ({err}); fix or remove "
                                    "it, or set data.skip_corrupt=true to skip such files")
                ok[i] = False
                skipped.append((str(files[i]), err.kind))
                print(f"skipping {files[i]}: {err}", file=sys.stderr)
            if show_progress and (done % 2000 == 0 or done == len(files)):
                print(f"decoded {done}/{len(files)} images from {root}", file=sys.stderr)
    return x[ok], y[ok], skipped


def _folder_splits(cfg: DataConfig):
    """Listed, not decoded: (files, labels) of the training pool (cut to data.limit) and of the
    test split, the class names, and the two roots."""
    root = storage.normalize(cfg.path)
    files, y, names = _list_folder(root, None)
    if cfg.test_path:
        test_root = storage.normalize(cfg.test_path)
        test_files, y_test, _ = _list_folder(test_root, names)
    else:
        test_root = root
        keep, held = stratified_split(y, cfg.test_fraction, cfg.seed + 1)
        files, y, test_files, y_test = files[keep], y[keep], files[held], y[held]
    keep = _limit(cfg, y)
    return files[keep], y[keep], test_files, y_test, names, root, test_root


def _folder_pools(cfg: DataConfig) -> _Pools:
    files, y, test_files, y_test, names, root, test_root = _folder_splits(cfg)
    x_test, y_test, skipped_test = _decode_files(test_files, y_test, cfg, test_root)
    x, y, skipped = _decode_files(files, y, cfg, root)
    return _Pools(x, y, x_test, y_test, names, cfg.color_mode, skipped + skipped_test)


def _load_folder(cfg: DataConfig, test_only: bool, cache_root: str | None) -> Dataset:
    """Split by file, then decode: the test split into memory; train and validation into
    memory or, past the memory budget (or with data.cache: disk), into the decoded cache."""
    files, y, test_files, y_test, names, root, test_root = _folder_splits(cfg)
    x_test, y_test, skipped = _decode_files(test_files, y_test, cfg, test_root)
    if test_only:
        return _test_split_only(x_test, y_test, names, cfg.color_mode, skipped)
    train_idx, val_idx = _validation_split(cfg, y)
    decoded_mb = len(y) * _image_bytes(cfg) / 2**20
    if cfg.cache == "memory" or (cfg.cache == "auto" and decoded_mb <= cfg.memory_budget_mb):
        x_train, y_train, skipped_train = _decode_files(files[train_idx], y[train_idx], cfg, root)
        x_val, y_val, skipped_val = _decode_files(files[val_idx], y[val_idx], cfg, root)
        return Dataset(x_train, y_train, x_val, y_val, x_test, y_test, names, cfg.color_mode,
                       skipped_train + skipped_val + skipped)
    where = storage.normalize(cfg.cache_path or cache_root or default_cache_root())
    if cfg.cache == "auto":
        print(f"data: {len(y)} training and validation images decode to {decoded_mb:.0f} MB, "
              f"over data.memory_budget_mb={cfg.memory_budget_mb}: streaming them from a "
              f"decoded cache under {where}", file=sys.stderr)
    train_shards, y_train, skipped_train = _cached(cfg, "train", files[train_idx], y[train_idx],
                                                   where, root)
    val_shards, y_val, skipped_val = _cached(cfg, "val", files[val_idx], y[val_idx], where, root)
    empty = np.zeros((0, *train_shards.shape), dtype=np.uint8)
    return Dataset(empty, y_train, empty, y_val, x_test, y_test, names, cfg.color_mode,
                   skipped_train + skipped_val + skipped, train_shards=train_shards,
                   val_shards=val_shards)


def default_cache_root() -> str:
    return str(storage.cache_dir("decoded"))


def _image_bytes(cfg: DataConfig) -> int:
    return cfg.image_size[0] * cfg.image_size[1] * (1 if cfg.color_mode == "grayscale" else 3)


def _cached(cfg: DataConfig, split: str, files: np.ndarray, y: np.ndarray, where: str,
            root: str) -> tuple[cache.Shards, np.ndarray, list[tuple[str, str]]]:
    """The split's shards in the decoded cache: found there, or decoded once and written."""
    settings = {"image_size": list(cfg.image_size), "color_mode": cfg.color_mode,
                "resize": cfg.resize, "skip_corrupt": cfg.skip_corrupt}
    location = storage.join(where, cache.key(split, [str(f) for f in files], settings))
    found = cache.open_cached(location)
    if found is not None:
        print(f"data: {split} split read from the decoded cache {location}", file=sys.stderr)
        return found
    per_shard = max(1, cfg.memory_budget_mb * 2**20 // 8 // _image_bytes(cfg))
    starts = range(0, len(files), per_shard)

    def chunks():
        for n, start in enumerate(starts, start=1):
            end = start + per_shard
            yield _decode_files(files[start:end], y[start:end], cfg, root)
            print(f"data: {split} shard {n}/{len(starts)} decoded into {location}",
                  file=sys.stderr)

    shape = (cfg.image_size[0], cfg.image_size[1], 1 if cfg.color_mode == "grayscale" else 3)
    return cache.write(location, shape, chunks())


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
