"""The CLI as a user runs it: a real subprocess, one JSON line on stdout, one-line errors."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, needs_fashion_mnist, write_folder


def clfsys(*args, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run([sys.executable, "-m", "clfsys.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def assert_user_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("clfsys: error: ")
    for fragment in fragments:
        assert fragment in last
    assert done.stdout == ""


@pytest.fixture
def job(tmp_path: Path) -> Path:
    folder = write_folder(tmp_path / "images", per_class=12)
    config = tmp_path / "job.yaml"
    config.write_text(f"""
data: {{dataset: folder, path: {folder}, image_size: [20, 20], val_fraction: 0.2}}
model: {{arch: cnn, filters: [8], dense: 16}}
train: {{epochs: 3, batch_size: 8, lr: 0.005, verbose: 0}}
""")
    return config


@pytest.mark.slow
def test_train_then_evaluate(job, tmp_path):
    out = tmp_path / "bundle"
    done = clfsys("train", "--config", job, "--set", "train.epochs=2", "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip())
    assert result["epochs_run"] == 2 and result["bundle"] == str(out)
    meta = json.loads((out / "metadata.json").read_text())
    assert result["model_id"] == meta["model_id"] and meta["config"]["train"]["epochs"] == 2
    evaluated = clfsys("evaluate", "--model", out)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["accuracy"] == result["test_accuracy"] and metrics["examples"] > 0
    again = clfsys("train", "--config", job, "--out", out)
    assert_user_error(again, "is not empty")


@pytest.mark.parametrize("args, fragments", [
    (["train", "--config", "missing.yaml", "--out", "x"], ["config file not found: missing.yaml"]),
    (["train", "--config", "jobs/fashion_mnist.yaml", "--set", "train.lr=-1", "--out", "x"],
     ["train.lr must be > 0, got -1"]),
    (["train", "--config", "jobs/fashion_mnist.yaml", "--set", "model.arch=vgg", "--out", "x"],
     ["model.arch must be one of", "'vgg'"]),
    (["train", "--config", "jobs/fashion_mnist.yaml", "--set", "train.nope=1", "--out", "x"],
     ["unknown config key 'train.nope'"]),
    (["evaluate", "--model", "no/such/bundle"], ["model bundle not found: no/such/bundle"]),
    (["evaluate", "--model", "jobs"], ["jobs is not a clfsys model bundle"]),
])
def test_user_mistakes_are_one_line_exit_2(args, fragments):
    assert_user_error(clfsys(*args), *fragments)


def test_data_mistakes_name_the_folder_or_file(job, tmp_path):
    images = tmp_path / "images"
    (images / "empty_class").mkdir()
    assert_user_error(clfsys("train", "--config", job, "--out", tmp_path / "o1"),
                      "class folder has no images", "empty_class")
    (images / "empty_class").rmdir()
    (images / "top" / "bad.jpg").write_bytes(b"")
    assert_user_error(clfsys("train", "--config", job, "--out", tmp_path / "o2"),
                      "bad.jpg", "empty file")
    single = write_folder(tmp_path / "single", per_class=3, classes=["only"])
    assert_user_error(clfsys("train", "--config", job, "--set", f"data.path={single}",
                             "--out", tmp_path / "o3"), "at least 2 class subfolders")


def test_a_ray_address_that_does_not_answer_is_one_line_exit_2(job, tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address, fragment in [(f"127.0.0.1:{port}", f"nothing answers at 127.0.0.1:{port}"),
                              ("head-node", "expected HOST:PORT")]:
        done = clfsys("tune", "--config", job, "--out", tmp_path / "search",
                      env={"RAY_ADDRESS": address})
        assert_user_error(done, f"RAY_ADDRESS={address}", fragment)


def test_a_ray_address_that_answers_but_is_no_ray_head_is_one_line_exit_2(job, tmp_path):
    """Something accepts connections there, but it is not a GCS: Ray's own ConnectionError
    becomes one line naming RAY_ADDRESS. Ray's retries are cut short to keep the test quick."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        port = server.getsockname()[1]
        threading.Thread(target=_accept_and_close, args=(server,), daemon=True).start()
        done = clfsys("tune", "--config", job, "--out", tmp_path / "search",
                      env={"RAY_ADDRESS": f"127.0.0.1:{port}",
                           "RAY_gcs_server_port_wait_time_s": "1",
                           "RAY_py_gcs_connect_timeout_s": "2",
                           "RAY_gcs_rpc_server_connect_timeout_s": "2"})
    assert_user_error(done, f"RAY_ADDRESS=127.0.0.1:{port}", "could not join the Ray cluster")


def _accept_and_close(server: socket.socket) -> None:
    while True:
        try:
            server.accept()[0].close()
        except OSError:  # the test closed the server
            return


@needs_fashion_mnist()
def test_export_images(tmp_path):
    out = tmp_path / "export"
    done = clfsys("export-images", "--dataset", "fashion_mnist", "--split", "test",
                  "--out", out, "--limit", "30")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 30
    assert len(list(out.rglob("*.png"))) == 30
    assert (out / "T-shirt_top").is_dir()


@pytest.mark.slow
def test_serve_without_its_token_variable_is_a_user_error(trained_bundle):
    env_free = clfsys("serve", "--model", trained_bundle, "--auth-token-env", "NO_SUCH_VAR_X")
    assert_user_error(env_free, "--auth-token-env NO_SUCH_VAR_X")


@pytest.mark.slow
def test_serve_on_a_metrics_port_in_use_is_a_user_error(trained_bundle):
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        done = clfsys("serve", "--model", trained_bundle, "--metrics-port", port)
    assert_user_error(done, f"--metrics-port {port} is in use")
