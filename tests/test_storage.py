"""One storage module for every location: local paths and a real S3 server (SeaweedFS)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, folder_config, write_folder

from clfsys import bundle, storage
from clfsys.errors import BundleError


def test_locations_join_and_name_keeping_a_uris_query():
    assert storage.is_uri("s3://b/k") and not storage.is_uri("file:///tmp/x")
    assert storage.normalize("file:///tmp/x/") == "/tmp/x"
    assert storage.join("s3://b/p?endpoint_override=h:1", "x", "y.png") == \
        "s3://b/p/x/y.png?endpoint_override=h:1"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.name("s3://b/p/x.png") == "x.png" and storage.name("/a/b") == "b"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_list_expand(where, tmp_path, request):
    base = str(tmp_path / "root") if where == "local" else \
        request.getfixturevalue("s3").uri("storage-test")
    for name in ("a/1.png", "a/2.jpg", "b/c/3.png", "notes.txt"):
        storage.write_bytes(storage.join(base, name), name.encode())
    assert storage.read_bytes(storage.join(base, "a/1.png")) == b"a/1.png"
    assert storage.is_dir(storage.join(base, "a"))
    assert storage.is_file(storage.join(base, "a/1.png"))
    assert [storage.name(f) for f in storage.list_files(base)] == [
        "1.png", "2.jpg", "3.png", "notes.txt"]
    assert [storage.name(d) for d in storage.list_dirs(base)] == ["a", "b"]
    assert storage.expand(storage.join(base, "a/1.png")) == [storage.join(base, "a/1.png")]
    assert [storage.name(f) for f in storage.expand(storage.join(base, "*/*.png"))] == ["1.png"]
    assert [storage.name(f) for f in storage.expand(storage.join(base, "b"))] == ["3.png"]
    with pytest.raises(storage.StorageError) as missing:
        storage.read_bytes(storage.join(base, "nope.png"))
    assert missing.value.not_found and "nope.png" in str(missing.value)
    with pytest.raises(storage.StorageError, match="no files match"):
        storage.expand(storage.join(base, "zz*"))
    assert storage.list_files(storage.join(base, "absent")) == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_many_returns_each_file_or_why_not_in_order(where, tmp_path, request):
    base = str(tmp_path / "many") if where == "local" else \
        request.getfixturevalue("s3").uri("read-many")
    names = [f"{i:03d}.bin" for i in range(40)]
    for name in names:
        storage.write_bytes(storage.join(base, name), name.encode() * 100)
    wanted = [storage.join(base, n) for n in names[:20]] + [storage.join(base, "gone.bin")] + \
        [storage.join(base, n) for n in names[20:]]
    got = storage.read_many(wanted, first_wait_s=0.01)
    missing = got.pop(20)
    assert got == [n.encode() * 100 for n in names]
    assert isinstance(missing, storage.StorageError) and missing.not_found
    assert str(missing) == f"{storage.join(base, 'gone.bin')}: no such file"


def test_read_many_from_unreachable_storage_returns_errors_after_its_attempts(s3):
    from clfsys.ingress import free_port

    down = f"s3://{s3.bucket}/k?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    got = storage.read_many([storage.join(down, "a.png"), storage.join(down, "b.png")],
                            attempts=2, first_wait_s=0.01)
    assert [type(g) for g in got] == [storage.StorageError] * 2
    assert not got[0].not_found and str(got[0]).startswith(storage.join(down, "a.png") + ": ")
    assert str(got[0]).endswith("(Connection refused)"), got[0]  # one line, with the cause


def test_retrying_backs_off_then_gives_up():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise storage.StorageError("down")
        return "ok"

    assert storage.retrying(flaky, first_wait_s=0.01) == "ok" and len(calls) == 3
    with pytest.raises(storage.StorageError):
        storage.retrying(lambda: (_ for _ in ()).throw(storage.StorageError("x")),
                         attempts=2, first_wait_s=0.01)
    calls.clear()

    def missing():
        calls.append(1)
        raise storage.StorageError("gone: no such file", not_found=True)

    with pytest.raises(storage.StorageError, match="no such file"):
        storage.retrying(missing, first_wait_s=0.01)
    assert len(calls) == 1  # an answer, not an outage: not asked again


def test_a_bundle_on_s3_is_fetched_checked_and_portable(s3, trained_bundle, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    uri = s3.uri("bundles", "fetched")
    storage.copy_tree(trained_bundle, uri)
    found = bundle.load(uri)
    local = bundle.load(trained_bundle)
    assert found.model_id == local.model_id and found.location == uri
    assert str(found.path).startswith(str(tmp_path / "cache"))
    assert bundle.portable(found).uri == uri and not bundle.portable(found).files
    shipped = bundle.portable(local)
    assert shipped.uri is None and set(shipped.files) == {"metadata.json", "model.keras"}
    opened = shipped.open()
    assert opened.model_id == local.model_id and opened.load_model() is not None
    # A changed model.keras at the URI is refused, naming it. (The cache is content-addressed:
    # with a verified copy already cached, the tampered file would never be read.)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    tampered = s3.uri("bundles", "tampered")
    storage.copy_tree(trained_bundle, tampered)
    data = bytearray(storage.read_bytes(storage.join(tampered, "model.keras")))
    data[-1] ^= 1
    storage.write_bytes(storage.join(tampered, "model.keras"), bytes(data))
    with pytest.raises(BundleError, match="does not match metadata model_file_sha256"):
        bundle.load(tampered)
    with pytest.raises(BundleError, match="not a clfsys model bundle"):
        bundle.load(s3.uri("bundles", "nothing-here"))


def test_a_folder_dataset_on_s3_loads_like_the_local_one(s3, tmp_path):
    from clfsys.data import load

    folder = write_folder(tmp_path / "images", per_class=6)
    storage.copy_tree(folder, s3.uri("datasets", "small"))
    local = load(folder_config(folder).data)
    remote = load(folder_config(s3.uri("datasets", "small")).data)
    assert remote.class_names == local.class_names
    for split in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(getattr(remote, split), getattr(local, split)), split


@pytest.mark.slow
def test_train_to_s3_then_evaluate_from_s3(s3, tmp_path):
    folder = write_folder(tmp_path / "images", per_class=12)
    out = s3.uri("trained", "one")
    run = [sys.executable, "-m", "clfsys.cli"]
    config = tmp_path / "job.yaml"
    config.write_text(f"""
data: {{dataset: folder, path: {folder}, image_size: [20, 20]}}
model: {{arch: cnn, filters: [8], dense: 16}}
train: {{epochs: 2, batch_size: 8, tensorboard: false, verbose: 0}}
""")
    sets = ["--config", str(config)]
    done = subprocess.run(run + ["train", "--out", out, *sets], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads(done.stdout.strip().splitlines()[-1])
    assert trained["bundle"] == out and storage.is_file(storage.join(out, "model.keras"))
    assert storage.is_file(storage.join(out, "plots", "confusion_matrix.png"))
    again = subprocess.run(run + ["train", "--out", out, *sets], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 2 and "is not empty" in again.stderr
    scored = subprocess.run(run + ["evaluate", "--model", out], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout.strip().splitlines()[-1])["model_id"] == trained["model_id"]
