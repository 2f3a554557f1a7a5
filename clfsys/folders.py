"""Image folders as a dataset: one subfolder per class, local or on object storage.

Folders are listed and split by file first, so only the files of the splits asked for are
decoded (4 threads, through images.decode). Past `data.memory_budget_mb` (or with `data.cache:
disk`) training and validation are decoded once into shards (cache.py) and streamed from there.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from clfsys import cache, images, storage
from clfsys.config import DataConfig
from clfsys.dataset import (
    Dataset,
    Pools,
    stratified_split,
    test_split_only,
    training_pool,
    validation_split,
)
from clfsys.errors import DataError

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


def decode_file(path: str, size: tuple[int, int], cfg: DataConfig) -> np.ndarray:
    return images.decode(storage.retrying(lambda: storage.read_bytes(path)), size,
                         cfg.color_mode, resize=cfg.resize)


def list_folder(root: str, class_names: list[str] | None
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
            x[i] = decode_file(files[i], size, cfg)
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
    files, y, names = list_folder(root, None)
    if cfg.test_path:
        test_root = storage.normalize(cfg.test_path)
        test_files, y_test, _ = list_folder(test_root, names)
    else:
        test_root = root
        keep, held = stratified_split(y, cfg.test_fraction, cfg.seed + 1)
        files, y, test_files, y_test = files[keep], y[keep], files[held], y[held]
    keep = training_pool(cfg, y)
    return files[keep], y[keep], test_files, y_test, names, root, test_root


def pools(cfg: DataConfig) -> Pools:
    files, y, test_files, y_test, names, root, test_root = _folder_splits(cfg)
    x_test, y_test, skipped_test = _decode_files(test_files, y_test, cfg, test_root)
    x, y, skipped = _decode_files(files, y, cfg, root)
    return Pools(x, y, x_test, y_test, names, cfg.color_mode, skipped + skipped_test)


def load(cfg: DataConfig, test_only: bool, cache_root: str | None) -> Dataset:
    """Split by file, then decode: the test split into memory; train and validation into
    memory or, past the memory budget (or with data.cache: disk), into the decoded cache."""
    files, y, test_files, y_test, names, root, test_root = _folder_splits(cfg)
    x_test, y_test, skipped = _decode_files(test_files, y_test, cfg, test_root)
    if test_only:
        return test_split_only(x_test, y_test, names, cfg.color_mode, skipped)
    train_idx, val_idx = validation_split(cfg, y)
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
