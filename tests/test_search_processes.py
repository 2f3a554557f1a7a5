"""The search as separate processes: a driver killed and resumed. (Jobs submitted to a real
two-node cluster are in test_cluster.py.)"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, job_config, read_trials
from infra import kill_sessions
from search_job import epochs_begun, went_on

pytestmark = pytest.mark.slow

JOB = str(Path(__file__).with_name("search_job.py"))


def move_forward(trial: Path) -> None:
    """Rename a trial's newest checkpoint to the next number: the search's saved state then
    records a checkpoint that is gone, as when Tune deleted it for a newer one and the driver
    was killed before saving its state again. A half-written newer one is left beside it."""
    newest = sorted(trial.glob("checkpoint_*"))[-1]
    index = int(newest.name.split("_")[1])
    moved = newest.with_name(f"checkpoint_{index + 1:06d}")
    newest.rename(moved)
    torn = newest.with_name(f"checkpoint_{index + 2:06d}")
    torn.mkdir()
    (torn / "state.json").write_text((moved / "state.json").read_text())


# `none`: test_cluster.py, on S3. (RungTPE's save and restore: tests/test_searchers.py.)
@pytest.mark.parametrize("scheduler, searcher", [("asha", "random")])
def test_resume_after_the_driver_is_killed_goes_on_where_each_trial_was(tmp_path, scheduler,
                                                                        searcher):
    config = job_config(tmp_path, f"""
  num_samples: 3
  max_concurrent_trials: 1
  scheduler: {scheduler}
  searcher: {searcher}
  max_epochs: 3
  grace_period: 1
  reduction_factor: 3
  space: {{train.lr: {{choice: [0.005, 0.01, 0.02]}}}}
""")
    out, log = tmp_path / "out", str(tmp_path / "epochs")
    command = [sys.executable, JOB, str(config), str(out), log]
    # Killed once a trial has begun epoch 2: under ASHA the trial promoted past the rung at
    # epoch 1 (the other two wait there), under `none` the first trial.
    with open(tmp_path / "first.log", "w") as first:
        driver = subprocess.Popen(command, cwd=ROOT, stdout=first, stderr=first,
                                  start_new_session=True)
        deadline = time.monotonic() + 300
        midway: list[str] = []
        while not midway and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
            begun = epochs_begun(log) if Path(log).exists() else {}
            midway = [t for t, epochs in begun.items() if max(epochs) == 2]
        kill_sessions(driver.pid)
        driver.wait()
    assert midway, (tmp_path / "first.log").read_text()[-3000:]
    assert not (out / "trials.csv").exists()  # the driver died before the end
    experiment = out / "ray" / "search"
    interrupted = experiment / f"trial_{midway[0]}"
    move_forward(interrupted)
    before = epochs_begun(log)

    done = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_trials(out / "trials.csv")
    assert len(table) == 3 and table["trial_id"].is_unique
    assert (table["status"] == "TERMINATED").all(), table.to_string()
    assert table["failure"].isna().all()
    # Every trial went on from where it was, also the one whose recorded checkpoint was gone:
    # none began again from scratch or from an older checkpoint.
    after = epochs_begun(log)
    for _, row in table.iterrows():
        trial = row["trial_id"]
        assert went_on(before.get(trial, []), after[trial], row["epochs_run"]), (
            trial, before.get(trial), after[trial])
    assert "resuming from checkpoint at epoch" in done.stderr
    if scheduler == "none":  # the first trial was midway, two had not started
        assert sorted(table["epochs_run"]) == [3, 3, 3]
    else:  # the two waiting at the rung were stopped there: neither began an epoch again
        assert sorted(table["epochs_run"]) == [1, 1, 3]
        assert {t: e for t, e in after.items() if t != midway[0]} == {
            t: e for t, e in before.items() if t != midway[0]} != {}
    assert json_line(done.stdout)["trials"] == 3


def json_line(stdout: str) -> dict:
    import ast

    return ast.literal_eval(stdout.strip().splitlines()[-1])


COUNT_DECODES = """
# Loaded first by every Python process of the test (PYTHONPATH): the driver, Ray's workers and
# the trials. Each call of the one decode path is recorded with the process that made it.
import os

import clfsys.folders as folders

_real = folders.decode_file


def _counting(path, size, cfg):
    with open(os.environ["CLFSYS_TEST_DECODE_LOG"], "a") as log:
        log.write(f"{os.getpid()} {path}\\n")
    return _real(path, size, cfg)


folders.decode_file = _counting
"""


def test_a_search_decodes_a_folder_once_in_all_its_processes(tmp_path):
    """A folder past the memory budget is decoded once, by the driver, into shards that every
    trial streams: no trial decodes a file again."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(COUNT_DECODES)
    config = job_config(tmp_path, """
  num_samples: 2
  scheduler: none
  max_epochs: 1
  grace_period: 1
  space: {train.lr: {choice: [0.01, 0.05]}}
""")
    log, out = tmp_path / "decodes.log", tmp_path / "out"
    env = {**os.environ, "CLFSYS_TEST_DECODE_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-m", "clfsys.cli", "tune", "--config",
                               str(config), "--out", str(out), "--set", "data.cache=disk",
                               "--set", "data.memory_budget_mb=1"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]
    table = read_trials(out / "trials.csv")
    assert list(table["status"]) == ["TERMINATED"] * 2 and (table["epochs_run"] == 1).all()
    assert sorted(p.parent.name.split("-")[0]
                  for p in (out / "ray" / "decoded").glob("*/manifest.json")) == ["train", "val"]
    calls = [line.split(" ", 1) for line in log.read_text().splitlines()]
    images = sorted(str(f) for f in (tmp_path / "images").rglob("*.*"))
    assert sorted(path for _, path in calls) == images  # each file once, in all processes
    assert {pid for pid, _ in calls} == {str(driver.pid)}  # by the driver: no trial decoded
