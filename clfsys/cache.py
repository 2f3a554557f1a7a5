"""The decoded-image cache: a split of an image folder decoded once into uint8 shards at a
location (local path or URI) that every trial reads every epoch, on any node.

Layout of one cached split, `<root>/<key>/`: `shard-00000.npy` ... (uint8 [n, H, W, C]),
`labels.npy` (int64, every example in shard order) and `manifest.json`, written last: a split
without it is incomplete and is decoded again. The key hashes the split's file list with the
decode settings (image size, colour mode, resize), so each (file, settings) is decoded once; a
file changed in place under the same name is not noticed (delete the cache, or name another
`data.cache_path`).

`stream()` feeds Keras from the shards holding one shard at a time, so training memory does not
grow with the dataset. Nothing here imports TensorFlow at import time.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from clfsys import storage
from clfsys.errors import first_line

FORMAT = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"


@dataclass(frozen=True)
class Shards:
    """One cached split: where it is and how many examples each shard holds."""

    location: str
    counts: tuple[int, ...]
    shape: tuple[int, int, int]

    @property
    def examples(self) -> int:
        return sum(self.counts)

    def shard(self, i: int) -> str:
        return storage.join(self.location, f"shard-{i:05d}.npy")

    def read(self, i: int) -> np.ndarray:
        data = storage.retrying(lambda: storage.read_bytes(self.shard(i)))
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:  # numpy names no file: say which
            raise storage.StorageError(
                f"{self.shard(i)}: not a whole shard ({len(data):,} bytes: "
                f"{first_line(exc)}); delete the "
                f"cache folder {self.location} to decode the images again") from None
        if array.shape != (self.counts[i], *self.shape) or array.dtype != np.uint8:
            raise storage.StorageError(f"{self.shard(i)}: holds {array.dtype} {array.shape}, "
                                       f"the manifest says uint8 {(self.counts[i], *self.shape)}")
        return array


def key(split: str, files: list[str], settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT, split, settings, files]).encode())
    return f"{split}-{digest.hexdigest()[:20]}"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def open_cached(location: str) -> tuple[Shards, np.ndarray, list[tuple[str, str]]] | None:
    """A complete cached split at `location`: (shards, labels, skipped files), else None."""
    try:
        manifest = json.loads(storage.read_text(storage.join(location, MANIFEST)))
    except storage.StorageError as exc:
        if exc.not_found:
            return None
        raise
    shards = Shards(location, tuple(manifest["counts"]), tuple(manifest["shape"]))
    labels = np.load(io.BytesIO(storage.read_bytes(storage.join(location, LABELS))))
    return shards, labels, [tuple(s) for s in manifest["skipped"]]


def write(location: str, shape: tuple[int, int, int],
          chunks: Iterator[tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]]
          ) -> tuple[Shards, np.ndarray, list[tuple[str, str]]]:
    """Write the decoded (x, y, skipped) chunks as shards, then the labels and the manifest."""
    counts, labels, skipped = [], [], []
    for x, y, chunk_skipped in chunks:
        skipped += chunk_skipped
        if len(x):
            storage.write_bytes(storage.join(location, f"shard-{len(counts):05d}.npy"), _npy(x))
            counts.append(len(x))
            labels.append(y)
    y_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    storage.write_bytes(storage.join(location, LABELS), _npy(y_all))
    storage.write_text(storage.join(location, MANIFEST), json.dumps(
        {"format": FORMAT, "counts": counts, "shape": list(shape),
         "skipped": [list(s) for s in skipped]}))
    return Shards(location, tuple(counts), shape), y_all, skipped


def epoch_order(shards: Shards, seed: int, epoch: int, shuffle: bool
                ) -> list[tuple[int, np.ndarray]]:
    """(shard, the positions in it) in the order one epoch reads them: shards in a shuffled
    order, each one's examples shuffled within it; in storage order without `shuffle`."""
    if not shuffle:
        return [(i, np.arange(n)) for i, n in enumerate(shards.counts)]
    rng = np.random.default_rng([seed, epoch])
    return [(int(i), rng.permutation(shards.counts[i]))
            for i in rng.permutation(len(shards.counts))]


def stream(shards: Shards, labels: np.ndarray, batch_size: int, *, shuffle: bool,
           seed: int = 0, first_epoch: int = 0,
           reader: Callable[[int], np.ndarray] | None = None):
    """A keras.utils.PyDataset of (pixels, labels) batches read shard by shard; batches never
    cross shards, so one shard is held at a time. Pass `shuffle=False` to `fit` (the order is
    this stream's own: Keras shuffling batch indices would read a shard per batch)."""
    import keras

    offsets = np.concatenate([[0], np.cumsum(shards.counts)])
    read = reader or shards.read

    class ShardStream(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = first_epoch  # a resumed run does not replay epoch 0's order
            self.held: tuple[int, np.ndarray] | None = None
            self._plan()

        def _plan(self) -> None:
            self.batches = [(shard, positions[start:start + batch_size])
                            for shard, positions in epoch_order(shards, seed, self.epoch,
                                                                shuffle)
                            for start in range(0, len(positions), batch_size)]

        def __len__(self) -> int:
            return len(self.batches)

        def __getitem__(self, index: int):
            shard, positions = self.batches[index]
            if self.held is None or self.held[0] != shard:
                self.held = None  # free the previous shard before reading the next
                self.held = (shard, read(shard))
            return self.held[1][positions], labels[offsets[shard] + positions]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.held = None
            self._plan()

    return ShardStream()
