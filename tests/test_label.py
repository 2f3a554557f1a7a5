"""`clfsys label` on real files with a real local Ray: every file accounted for."""

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, needs_fashion_mnist
from PIL import Image

from clfsys import label, label_output, report
from clfsys.errors import BundleError, DataError, IncompleteError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def shutdown_ray():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def fmnist_bundle(tmp_path_factory) -> Path:
    """A small real Fashion-MNIST model (28x28 grayscale), trained for one epoch."""
    from clfsys.config import load_config
    from clfsys.train import publish, train

    out = tmp_path_factory.mktemp("fm") / "bundle"
    cfg = load_config(None, ["data.limit=3000", "model.arch=mlp", "model.units=[32]",
                             "train.epochs=1", "train.verbose=0", "train.tensorboard=false"])
    publish(train(cfg), out)
    return out


def png(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def write_zoo(root: Path) -> dict[str, str | None]:
    """Good and bad files of every kind; returns file name -> expected error (None: labelled)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    (root / "nested" / "deeper").mkdir(parents=True)
    files: dict[str, bytes] = {}
    expected: dict[str, str | None] = {}

    def add(name: str, data: bytes, error: str | None) -> None:
        files[name] = data
        expected[name] = error

    for i in range(5):
        add(f"nested/good_{i}.png", png(rng.integers(0, 255, (28, 28), dtype=np.uint8)), None)
    jpeg = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(jpeg, "JPEG")
    add("cmyk.JPG", jpeg.getvalue(), None)
    add("sixteen_bit.png", png(np.full((20, 20), 40000, dtype=np.uint16)), None)
    add("palette_alpha.png", png(np.asarray(Image.fromarray(rgb).convert("P")),
                                 transparency=0), None)
    add("gray.webp", _encode(Image.fromarray(rgb).convert("L"), "WEBP"), None)
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    add("nested/deeper/animated.gif", gif.getvalue(), None)
    add("tiff_image.tiff", _encode(Image.fromarray(rgb), "TIFF"), None)
    add("empty.png", b"", "empty file")
    add("nested/not_really.jpeg", b"just some text, not pixels", "not an image")
    good = png(rgb)
    add("truncated.png", good[: len(good) // 2], "truncated")
    add("bomb.png", huge_png_header(100_000, 100_000), "too many pixels")
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("not an input")
    return expected


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def read_rows(output: Path) -> list[dict]:
    return pq.read_table(output).to_pylist()


def test_every_file_gets_exactly_one_row_with_the_right_error(fmnist_bundle, tmp_path, capsys):
    root = tmp_path / "zoo"
    expected = write_zoo(root)
    out = tmp_path / "labels"
    summary = label.run_label(str(fmnist_bundle), [str(root)], str(out))
    rows = read_rows(out)
    by_path = {Path(r["path"]).relative_to(root).as_posix(): r for r in rows}
    assert len(rows) == len(by_path) == len(expected)
    assert set(by_path) == set(expected)
    for name, error in expected.items():
        row = by_path[name]
        assert row["error"] == error, name
        if error is None:
            assert row["label"] in json.loads((fmnist_bundle / "metadata.json").read_text())[
                "class_names"]
            assert 0 <= row["confidence"] <= 1 and len(row["top_k"]) == 3
            assert row["top_k"][0]["label"] == row["label"]
            assert row["needs_review"] == (row["confidence"] < 0.5)
        else:
            assert row["label"] is None and row["confidence"] is None
    assert summary["files"] == len(expected) and summary["missing"] == 0 and summary["ok"]
    assert summary["errors"] == {"empty file": 1, "not an image": 1, "truncated": 1,
                                 "too many pixels": 1}
    assert "labelled 11 of 15 files" in capsys.readouterr().err
    written = json.loads((out / label_output.SUMMARY_FILE).read_text())
    assert written["labelled"] == 11 and sum(written["per_class"].values()) == 11
    page = (out / label_output.REPORT_FILE).read_text()
    # Two plots (per class, confidence) and a thumbnail of each labelled image (fewer than 24).
    assert "The 11 least confident images" in page and page.count("<figure") == 11
    assert page.count("data:image/png;base64") == 2 + 11


def test_a_file_that_cannot_be_read_is_no_row_and_the_run_is_incomplete(fmnist_bundle,
                                                                        tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(png(np.full((28, 28), i * 80, dtype=np.uint8)))
    os.symlink(root / "nowhere.png", root / "dangling.png")  # listed, but cannot be read
    out = tmp_path / "labels"
    with pytest.raises(IncompleteError, match="1 files could not be read") as raised:
        label.run_label(str(fmnist_bundle), [str(root)], str(out))
    result = raised.value.result
    assert (result["labelled"], result["unread"], result["missing"], result["ok"]) == \
        (3, 1, 1, False)
    assert {Path(r["path"]).name for r in read_rows(out)} == {"0.png", "1.png", "2.png"}
    unread = json.loads((out / label_output.UNREAD_FILE).read_text())
    assert list(unread) == [str(root / "dangling.png")] and "no such file" in unread[
        str(root / "dangling.png")]
    # --resume tries exactly the unread file again; now it is there.
    os.unlink(root / "dangling.png")
    (root / "dangling.png").write_bytes(png(np.zeros((28, 28), dtype=np.uint8)))
    summary = label.run_label(str(fmnist_bundle), [str(root)], str(out), resume=True)
    assert summary["ok"] and summary["labelled"] == 4 and summary["rows"] == 4
    assert not (out / label_output.UNREAD_FILE).exists()


def test_missing_files_do_not_stop_the_reading_of_others(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png(np.full((28, 28), 200, dtype=np.uint8)))
    paths = [str(tmp_path / f"gone_{i}.png") for i in range(4)] + [str(good)]
    out = label.decode_batch({"path": np.array(paths, dtype=object)}, (28, 28), "grayscale",
                             label.images.DEFAULT_MAX_PIXELS)
    assert [e is None for e in out["read_error"]] == [False] * 4 + [True]
    assert all("no such file" in e for e in out["read_error"][:4])
    assert out["error"][4] is None and out["image"][4].mean() == 200


def test_an_open_breaker_probes_and_a_successful_probe_reads_the_rest(tmp_path):
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for f in files:
        f.write_bytes(png(np.zeros((28, 28), dtype=np.uint8)))
    # A probe interval longer than this machine has been up (time.monotonic() counts from
    # boot): a breaker that never probed must still probe at once.
    breaker = label.ReadBreaker(give_up_after=2, probe_every_s=time.monotonic() + 3600)
    breaker.in_a_row = 2  # storage was failing; no probe yet
    read = list(label.read_files([str(f) for f in files], breaker))
    assert read == [f.read_bytes() for f in files]  # the probe worked: all read, none skipped
    assert not breaker.open
    breaker.in_a_row, breaker.last = 2, "down"  # failing again, and the last probe just now
    assert list(label.read_files([str(files[0])], breaker)) == [
        f"{files[0]}: not tried, storage failing (down)"]


def test_only_the_image_bytes_make_an_error_row_a_bug_fails_the_batch(tmp_path, monkeypatch):
    from clfsys import images

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(good)
    bad.write_bytes(b"not a png")
    paths = np.array([str(good), str(bad)], dtype=object)
    out = label.decode_batch({"path": paths}, (28, 28), "grayscale", 10**6)
    assert list(out["error"]) == [None, images.NOT_AN_IMAGE]

    def broken(*args, **kwargs):
        raise AttributeError("a bug, not a bad image")

    monkeypatch.setattr(images, "decode", broken)
    with pytest.raises(AttributeError, match="a bug, not a bad image"):
        label.decode_batch({"path": paths}, (28, 28), "grayscale", 10**6)


def test_resume_refuses_an_output_of_another_model(fmnist_bundle, trained_bundle, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.png").write_bytes(png(np.zeros((28, 28), dtype=np.uint8)))
    out = tmp_path / "labels"
    label.run_label(str(fmnist_bundle), [str(root)], str(out))
    other = json.loads((trained_bundle / "metadata.json").read_text())["model_id"]
    mine = json.loads((fmnist_bundle / "metadata.json").read_text())["model_id"]
    with pytest.raises(DataError, match=f"holds labels of model_id {mine}, this run's model "
                                        f"is {other}"):
        label.run_label(str(trained_bundle), [str(root)], str(out), resume=True)


def test_parquet_schema_and_readers(fmnist_bundle, tmp_path):
    import duckdb
    import pandas as pd

    root = tmp_path / "few"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(png(np.full((28, 28), i * 80, dtype=np.uint8)))
    (root / "bad.png").write_bytes(b"")
    out = tmp_path / "labels"
    label.run_label(str(fmnist_bundle), [str(root / "*.png")], str(out))
    assert pq.read_schema(next(out.glob("*.parquet"))) == label_output.schema()
    frame = pd.read_parquet(out)  # the report files start with '_': readers skip them
    assert list(frame.columns) == ["path", "label", "label_index", "confidence", "top_k",
                                   "needs_review", "error", "model_id"]
    assert frame["model_id"].nunique() == 1
    count, errors = duckdb.sql(
        f"select count(*), count(error) from read_parquet('{out}/*.parquet')").fetchall()[0]
    assert (count, errors) == (4, 1)


@needs_fashion_mnist()
def test_labels_match_the_predictor_on_the_original_arrays(fmnist_bundle, tmp_path):
    import keras

    from clfsys.config import DataConfig
    from clfsys.data import export_images
    from clfsys.predict import Predictor

    export = tmp_path / "export"
    export_images(DataConfig(), "test", export, limit=300)
    out = tmp_path / "labels"
    label.run_label(str(fmnist_bundle), [str(export)], str(out),
                    options=label.LabelOptions(batch_size=64, actors=2))
    rows = read_rows(out)
    assert len(rows) == 300
    _, (x_test, _) = keras.datasets.fashion_mnist.load_data()
    direct = Predictor(fmnist_bundle).predict(x_test[:300, :, :, None])
    for row in rows:
        i = int(Path(row["path"]).stem.split("_")[1])
        assert row["label_index"] == direct["label_index"][i]
        assert row["confidence"] == pytest.approx(direct["confidence"][i], abs=1e-6)


def test_refuses_a_non_empty_output_without_resume(fmnist_bundle, tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="already holds 1 Parquet files; pass --resume"):
        label.run_label(str(fmnist_bundle), [str(tmp_path)], str(out))
    with pytest.raises(DataError, match="no image files"):
        label.run_label(str(fmnist_bundle), [str(out)], str(tmp_path / "o2"))


def test_an_altered_model_file_is_refused_before_ray_starts(fmnist_bundle, tmp_path):
    altered = tmp_path / "bundle"
    shutil.copytree(fmnist_bundle, altered)
    with open(altered / "model.keras", "ab") as handle:
        handle.write(b"\0")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (28, 28)).save(images / "a.png")
    with pytest.raises(BundleError, match="model.keras: file does not match"):
        label.run_label(str(altered), [str(images)], str(tmp_path / "out"))


def test_blocks_spread_small_inputs_over_the_cores_and_cap_large_ones():
    per_block = label.BATCHES_PER_BLOCK * 512
    # ~10,000 photos on 2 CPUs: enough blocks for every core and the actor to start early.
    assert label.num_blocks(9925, 512, cpus=2) == 2 * label.BLOCKS_PER_CPU
    # Many files: blocks of BATCHES_PER_BLOCK batches, whatever the cluster.
    assert label.num_blocks(1_000_000, 512, cpus=2) == -(-1_000_000 // per_block)
    # Never blocks smaller than one batch, never zero blocks.
    assert label.num_blocks(1000, 512, cpus=64) == 2
    assert label.num_blocks(1, 512, cpus=2) == 1


def complete_rows(out: Path) -> int:
    """Rows in the Parquet files under `out` (each one appears whole: written, then renamed)."""
    return sum(pq.read_metadata(file).num_rows for file in out.glob("*.parquet"))


def test_resume_after_a_kill_labels_every_file_exactly_once(fmnist_bundle, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3000):
        (root / f"{i:05d}.png").write_bytes(png(rng.integers(0, 255, (28, 28), dtype=np.uint8)))
    out = tmp_path / "labels"
    command = [sys.executable, "-m", "clfsys.cli", "label", "--model", str(fmnist_bundle),
               "--input", str(root), "--output", str(out), "--batch-size", "32"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log,
                                 start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if complete_rows(out):
                break
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert 0 < complete_rows(out) < 3000, (tmp_path / "first.log").read_text()[-2000:]

    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    done = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 3000
    assert json.loads(done.stdout)["duplicates"] == 0


def test_s3_to_s3_through_a_delay_reads_many_files_at_once_and_labels_each_once(
        fmnist_bundle, s3, tmp_path):
    """With 10 ms added each way (a round trip like S3's first byte), reading one object after
    another would cost a round trip each in series: the proxy sees many GETs in flight."""
    from infra import DelayProxy

    from clfsys import storage

    inputs, output = s3.uri("delayed", "in"), s3.uri("delayed", "out")
    rng = np.random.default_rng(0)
    names = [f"{i:04d}.png" for i in range(150)]
    for name in names:
        storage.write_bytes(storage.join(inputs, name),
                            png(rng.integers(0, 255, (28, 28), dtype=np.uint8)))
    proxy = DelayProxy(int(s3.endpoint.rsplit(":", 1)[1]), delay_s=0.010)
    try:
        env = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": proxy.url}
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run([sys.executable, "-m", "clfsys.cli", "label", "--model",
                               str(fmnist_bundle), "--input", inputs, "--output", output],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        proxy.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    paths = label_output.read_output(output, ["path"]).column("path").to_pylist()
    assert sorted(paths) == sorted(storage.join(inputs, n) for n in names)
    # More GETs at once than decode tasks can run at once: each task had several in flight.
    tasks = int(os.cpu_count() / label.TASK_CPUS)
    assert proxy.most_in_flight > tasks, (proxy.most_in_flight, tasks)
    # One round trip per object: GETs only, no HEAD asking for the size first; each file read
    # once, and the report's least confident images once more for their thumbnails.
    asked = Counter(r for r in proxy.requests if "/delayed/in/" in r)
    assert set(asked) == {f"GET /{s3.bucket}/delayed/in/{n}" for n in names}, asked
    assert sum(asked.values()) == len(names) + report.SHEET_SIZE, asked
    # Each output file is one PUT (then read back to be counted): no multipart upload.
    parts = {storage.name(f) for f in label_output.output_files(output)}
    written = [r for r in proxy.requests if "/delayed/out/part-" in r and
               not r.startswith(("GET ", "HEAD "))]
    assert sorted(written) == sorted(f"PUT /{s3.bucket}/delayed/out/{p}" for p in parts), written
