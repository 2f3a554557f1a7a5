"""The search as separate processes: a driver killed and resumed, and a job submitted to a
real two-node Ray cluster (token authentication on) whose worker node declares logical GPUs."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, free_port, write_folder

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def job_config(tmp_path: Path, tune: str) -> Path:
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


def epochs_reported(trial: Path) -> list[int]:
    lines = (trial / "result.json").read_text().splitlines() if (trial / "result.json").exists() \
        else []
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


def test_resume_after_the_driver_is_killed(tmp_path):
    config = job_config(tmp_path, """
  num_samples: 3
  max_concurrent_trials: 1
  scheduler: none
  max_epochs: 3
  space: {train.lr: {choice: [0.005, 0.01, 0.02]}}
""")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "clfsys.cli", "tune", "--config", str(config),
               "--out", str(out)]
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log,
                                  start_new_session=True)
        deadline = time.monotonic() + 300
        finished: list[Path] = []
        while not finished and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
            finished = [t for t in (out / "ray" / "search").glob("trial_*")
                        if 3 in epochs_reported(t)]
        kill_sessions(driver.pid)
        driver.wait()
    assert finished, (tmp_path / "first.log").read_text()[-3000:]
    assert not (out / "trials.csv").exists()  # the driver died before the end
    before = {t.name: (t / "result.json").read_text() for t in finished}

    done = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 3 and table["trial_id"].is_unique
    assert (table["status"] == "TERMINATED").all() and (table["epochs_run"] == 3).all()
    for name, text in before.items():  # finished trials were not run again
        assert (out / "ray" / "search" / name / "result.json").read_text() == text
    for trial in (out / "ray" / "search").glob("trial_*"):
        assert sorted(set(epochs_reported(trial))) == [1, 2, 3]
    assert json.loads(done.stdout)["trials"] == 3


def kill_sessions(*sids: int) -> None:
    """SIGKILL every process in these sessions: Ray's daemons outlive the command that started
    them, but stay in its session."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            sid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        if sid in sids:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def test_tune_job_on_a_two_node_cluster_puts_gpu_trials_on_the_gpu_node(tmp_path):
    config = job_config(tmp_path, """
  num_samples: 2
  max_epochs: 2
  resources: {cpu: 1, gpu: 1}
  space: {train.lr: {choice: [0.01, 0.02]}}
""")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    head_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    gpu_tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")
    gcs, dashboard = free_port(), free_port()
    url = f"http://127.0.0.1:{dashboard}"

    sessions: list[int] = []

    def ray(*args, check=True, environ=env, timeout=180):
        proc = subprocess.Popen([str(BIN / "ray"), *args], cwd=ROOT, env=environ, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        sessions.append(proc.pid)
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0 or not check, stdout[-2000:] + stderr[-3000:]
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    try:
        ray("start", "--head", f"--port={gcs}", "--num-cpus=1", "--num-gpus=0",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}", f"--temp-dir={head_tmp}",
            f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats")
        # A second node on this machine declaring two logical GPUs; its own temp dir keeps its
        # runtime-env files apart from the head's.
        ray("start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--num-gpus=2",
            f"--temp-dir={gpu_tmp}", f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats")
        nodes = json.loads(ray("list", "nodes", "--address", f"127.0.0.1:{gcs}",
                               "--format", "json").stdout)
        gpu_nodes = [n["node_id"] for n in nodes if n["resources_total"].get("GPU")]
        assert len(nodes) == 2 and len(gpu_nodes) == 1

        stranger = {**env, "HOME": str(tmp_path)}  # no token anywhere
        del stranger["RAY_AUTH_TOKEN"]
        refused = ray("job", "submit", "--address", url, "--", "echo", "hi", check=False,
                      environ=stranger, timeout=60)
        assert refused.returncode != 0

        out = tmp_path / "out"
        submit = ["job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
                  "python", "jobs/tune.py", "--config", str(config), "--out", str(out)]
        deadline = time.monotonic() + 120
        while True:  # the head's job agent can take a while to come up on a loaded machine
            done = ray(*submit, check=False, timeout=600)
            if "No available agent" not in done.stderr + done.stdout or \
                    time.monotonic() > deadline:
                break
            time.sleep(3)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        table = pd.read_csv(out / "trials.csv", dtype={"cuda_visible_devices": str})
        assert len(table) == 2 and (table["status"] == "TERMINATED").all()
        assert (table["node_id"] == gpu_nodes[0]).all()
        assert set(table["cuda_visible_devices"]) <= {"0", "1"}
        assert (out / "best" / "metadata.json").is_file()
    finally:
        kill_sessions(*sessions)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(gpu_tmp, ignore_errors=True)
