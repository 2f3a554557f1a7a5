"""The search as separate processes: a driver killed and resumed. (Jobs submitted to a real
two-node cluster are in test_cluster.py.)"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, job_config
from infra import kill_sessions

pytestmark = pytest.mark.slow


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
