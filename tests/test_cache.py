"""The decoded cache: the same examples as the in-memory path, each file decoded once, and
training whose memory does not grow with the dataset (real decoding, real Keras training)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_folder

from clfsys import cache, data
from clfsys.config import DataConfig
from clfsys.storage import StorageError


def folder_cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="folder", path=str(root), image_size=[32, 32], val_fraction=0.2,
                      test_fraction=0.2, **kw)


def batches(stream) -> tuple[np.ndarray, np.ndarray]:
    parts = [stream[i] for i in range(len(stream))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def rows(x: np.ndarray, y: np.ndarray) -> list[tuple[bytes, int]]:
    return sorted((image.tobytes(), int(label)) for image, label in zip(x, y, strict=True))


def test_streaming_gives_the_same_examples_and_labels_as_memory(tmp_path, decodes):
    root = write_folder(tmp_path / "imgs", per_class=30, size=40)
    memory = data.load(folder_cfg(root, cache="memory"))
    assert len(decodes) == 90 and memory.train_shards is None
    decodes.clear()
    # 1 MB budget: shards of 1/8 MB = 42 images of 32x32x3.
    disk_cfg = folder_cfg(root, cache="disk", memory_budget_mb=1, cache_path=str(tmp_path / "c"))
    disk = data.load(disk_cfg)
    assert sorted(decodes) == sorted(str(f) for f in root.rglob("*.*"))  # each file once
    assert disk.train_shards.counts == (42, 15) and disk.val_shards.counts == (15,)
    assert len(disk.x_train) == 0 and disk.input_shape == memory.input_shape == (32, 32, 3)
    # Unshuffled, the shards hold exactly the in-memory arrays, in the same order.
    x, y = batches(cache.stream(disk.train_shards, disk.y_train, 10, shuffle=False))
    assert np.array_equal(x, memory.x_train) and np.array_equal(y, memory.y_train)
    x, y = batches(cache.stream(disk.val_shards, disk.y_val, 10, shuffle=False))
    assert np.array_equal(x, memory.x_val) and np.array_equal(y, memory.y_val)
    assert np.array_equal(disk.x_test, memory.x_test)
    # Shuffled: every epoch is the same examples with their labels, in a new, seeded order.
    stream = cache.stream(disk.train_shards, disk.y_train, 10, shuffle=True, seed=3)
    first = batches(stream)
    stream.on_epoch_end()
    second = batches(stream)
    assert rows(*first) == rows(*second) == rows(memory.x_train, memory.y_train)
    assert not np.array_equal(first[0], second[0])
    again = batches(cache.stream(disk.train_shards, disk.y_train, 10, shuffle=True, seed=3))
    assert np.array_equal(again[0], first[0])
    # A second load finds the cache: only the test split (held in memory) is decoded again.
    decodes.clear()
    reread = data.load(disk_cfg)
    assert len(decodes) == len(memory.y_test)
    assert reread.train_shards == disk.train_shards


def test_auto_streams_only_past_the_memory_budget(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=30, size=40)
    small = data.load(folder_cfg(root, memory_budget_mb=1, cache_path=str(tmp_path / "c")))
    assert small.train_shards is None  # 72 images x 3 KB: under 1 MB
    big = data.load(DataConfig(dataset="folder", path=str(root), image_size=[128, 128],
                               memory_budget_mb=1, cache_path=str(tmp_path / "c")))
    assert big.train_shards is not None and big.train_shards.examples == len(big.y_train)
    assert "streamed from" in big.summary()


def test_a_torn_shard_is_named(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=10, size=32)
    ds = data.load(folder_cfg(root, cache="disk", cache_path=str(tmp_path / "c")))
    shard = ds.train_shards.shard(0)
    np.save(shard, np.zeros((3, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(Exception, match=r"shard-00000\.npy: holds uint8 \(3, 32, 32, 3\)"):
        ds.train_shards.read(0)


def test_a_truncated_shard_is_named_in_one_line(tmp_path):
    """A shard cut short (a copy killed midway): numpy's own error names no file."""
    root = write_folder(tmp_path / "imgs", per_class=10, size=32)
    ds = data.load(folder_cfg(root, cache="disk", cache_path=str(tmp_path / "c")))
    shard = Path(ds.train_shards.shard(0))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(StorageError) as raised:
        ds.train_shards.read(0)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{shard}: not a whole shard (1,000 bytes")
    assert f"delete the cache folder {ds.train_shards.location}" in message


PEAK_RSS = """
import json, sys
from clfsys.cli import main
try:
    main(sys.argv[1:])
finally:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) forking parent.
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}), file=sys.stderr)
"""


def peak_rss_mb(tmp_path, name: str, folder, *sets: str) -> float:
    job = tmp_path / f"{name}.yaml"
    job.write_text(json.dumps({
        "data": {"dataset": "folder", "path": str(folder), "image_size": [64, 64],
                 "test_fraction": 0.02, "val_fraction": 0.1},
        "model": {"arch": "cnn", "filters": [8], "dense": 16},
        "train": {"epochs": 1, "batch_size": 64, "tensorboard": False, "verbose": 0}}))
    run = subprocess.run([sys.executable, "-c", PEAK_RSS, "train", "--config", str(job),
                          "--out", str(tmp_path / f"out-{name}"),
                          *sum((["--set", s] for s in sets), [])],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and '"bundle"' in run.stdout, run.stderr[-3000:]
    return json.loads(run.stderr.strip().splitlines()[-1])["peak_rss_mb"]


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_dataset(tmp_path):
    """A folder decoding to ~59 MB trains from the cache under an 8 MB budget with peak RSS
    within BUDGET + OVERHEAD of the same training on a 60-image folder; the same folder in
    memory needs far more (so this test can fail)."""
    budget, overhead = 8, 40
    small = write_folder(tmp_path / "small", per_class=20, size=64)
    large = write_folder(tmp_path / "large", per_class=1600, size=64)
    cache_path = f"data.cache_path={tmp_path / 'cache'}"
    baseline = peak_rss_mb(tmp_path, "small", small, "data.cache=memory")
    streamed = peak_rss_mb(tmp_path, "streamed", large, "data.cache=disk", cache_path,
                           f"data.memory_budget_mb={budget}")
    in_memory = peak_rss_mb(tmp_path, "memory", large, "data.cache=memory")
    print(f"peak RSS: 60 images {baseline:.0f} MB; 4,800 streamed {streamed:.0f} MB; "
          f"4,800 in memory {in_memory:.0f} MB")
    assert streamed <= baseline + budget + overhead
    assert in_memory > baseline + budget + overhead
