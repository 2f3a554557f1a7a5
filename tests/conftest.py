"""Shared fixtures: tiny generated image folders, CSVs and one small trained bundle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# CI sets this: there, the split-disk cluster, the S3 server, HAProxy and ../shared's data are
# all available, so a test that skips hides a broken setup and fails instead.
NO_SKIPS = "CLFSYS_TEST_NO_SKIPS"

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
KERAS_FMNIST = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / \
    "fashion-mnist"
CLASSES = ["left", "right", "top"]


def pattern_image(label: int, size: int, rng: np.random.Generator, channels: int = 3):
    """A class-specific bright half (left / right / top) on noise: easy to learn, not trivial."""
    image = rng.integers(0, 60, size=(size, size, channels), dtype=np.uint8)
    half = size // 2
    if label == 0:
        image[:, :half] += 150
    elif label == 1:
        image[:, half:] += 150
    else:
        image[:half, :] += 150
    return image


def write_folder(root: Path, per_class: int, size: int = 20, seed: int = 0,
                 classes=CLASSES, nested: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / name / ("sub" if nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = ("png", "jpg", "PNG")[i % 3]
            image = Image.fromarray(pattern_image(label, size, rng))
            image.save(folder / f"img_{i}.{ext}", format="JPEG" if ext == "jpg" else "PNG",
                       **({"quality": 95} if ext == "jpg" else {}))
    return root


def write_csv(path: Path, rows: int, side: int = 8, seed: int = 0, classes: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % classes
    pixels = np.stack([pattern_image(int(y), side, rng, 1).ravel() for y in labels])
    header = "label," + ",".join(f"pixel{i + 1}" for i in range(side * side))
    lines = [header] + [f"{y}," + ",".join(map(str, p)) for y, p in zip(labels, pixels,
                                                                         strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get(NO_SKIPS) == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, which {NO_SKIPS}=1 (CI) forbids: {reason}"


@pytest.fixture
def decodes(monkeypatch):
    """The files the real decode path (clfsys.folders.decode_file) is called on, in this
    process."""
    from clfsys import folders

    seen: list[str] = []
    real = folders.decode_file

    def counting(path, size, cfg):
        seen.append(str(path))
        return real(path, size, cfg)

    monkeypatch.setattr(folders, "decode_file", counting)
    return seen


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "images", per_class=12)


def folder_config(path: Path, **overrides):
    from clfsys.config import load_config

    sets = {
        "data.dataset": "folder", "data.path": str(path), "data.image_size": [20, 20],
        "data.val_fraction": 0.2, "data.test_fraction": 0.2, "model.arch": "cnn",
        "model.filters": [8], "model.dense": 16, "train.epochs": 6, "train.batch_size": 8,
        "train.lr": 0.005, "train.verbose": 0, "train.patience": 6,
    }
    sets.update(overrides)
    return load_config(None, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                              for k, v in sets.items()])


def job_config(tmp_path: Path, tune: str) -> Path:
    """A search job on a small generated folder; `tune` is the YAML of its tune section."""
    folder = write_folder(tmp_path / "images", per_class=30, size=16)
    path = tmp_path / "job.yaml"
    path.write_text(f"""
data: {{dataset: folder, path: {folder}, image_size: [16, 16], val_fraction: 0.2}}
model: {{arch: cnn, filters: [8], dense: 16}}
train: {{batch_size: 8, lr: 0.01, optimizer: sgd, patience: 10}}
tune:
{tune}
""")
    return path


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> Path:
    """One real training run on a generated folder, published as a bundle (shared, read-only)."""
    from clfsys.train import publish, train

    root = tmp_path_factory.mktemp("bundle_data")
    folder = write_folder(root / "images", per_class=30)
    out = root / "bundle"
    result = train(folder_config(folder, **{"train.epochs": 8}), work_dir=out)
    publish(result, out)
    return out




def read_trials(source):
    """A search's trials.csv (a path, or the bytes read from a URI) with its id columns as text.
    A trial id is 8 hex digits, all of them decimal about once in 43 ids, and pandas reads such
    a column as numbers: a warm start's `continued_from` then no longer equals the trial id it
    names (a test failed so, about once in 30 runs)."""
    import io

    import pandas as pd

    return pd.read_csv(io.BytesIO(source) if isinstance(source, bytes) else source,
                       dtype={"trial_id": str, "continued_from": str,
                              "cuda_visible_devices": str})


def needs_fashion_mnist():
    have = all((KERAS_FMNIST / f).is_file() for f in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    return pytest.mark.skipif(not have, reason=f"Fashion-MNIST not in {KERAS_FMNIST} "
                              "(make test seeds it from ../shared)")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1, with the standard AWS variables pointing at it
    for this process and its children."""
    from infra import S3Server

    from clfsys import storage

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    storage.forget_clients()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage.forget_clients()
