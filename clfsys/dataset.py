"""The arrays a model trains on, and how they are split.

`Dataset` holds train / validation / test (uint8, NHWC); `Pools` is a dataset before its
validation split. Splits are stratified and seeded; `data.limit` keeps a stratified sample of the
training pool. The sources (data.py, folders.py) build these; train.py and results.py read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clfsys import cache
from clfsys.config import DataConfig
from clfsys.errors import DataError


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
class Pools:
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


def training_pool(cfg: DataConfig, y: np.ndarray) -> np.ndarray:
    """Indices of the training pool that `data.limit` keeps."""
    return (np.arange(len(y)) if cfg.limit is None
            else stratified_sample(y, cfg.limit, cfg.seed + 2))


def test_split_only(x_test, y_test, names, color_mode, skipped) -> Dataset:
    empty_x, empty_y = x_test[:0], y_test[:0]
    return Dataset(empty_x, empty_y, empty_x, empty_y, x_test, y_test, names, color_mode,
                   skipped)


def validation_split(cfg: DataConfig, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(np.unique(y)) < 2:
        raise DataError(f"{_describe(cfg)}: the training data has fewer than 2 classes")
    train_idx, val_idx = stratified_split(y, cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0:
        raise DataError(f"{_describe(cfg)}: too few examples for a validation split "
                        f"({len(y)} examples)")
    return train_idx, val_idx


def _describe(cfg: DataConfig) -> str:
    return cfg.path if cfg.path else cfg.dataset
