"""Real Ray Tune searches on a local Ray instance with tiny generated data."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, folder_config, needs_fashion_mnist, read_trials, write_folder

from clfsys import bundle
from clfsys.search import run_search

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # callbacks below go to workers
    yield
    ray.shutdown()


def search_config(folder: Path, space: str, **overrides):
    sets = {"data.image_size": [16, 16], "train.optimizer": "sgd", "train.patience": 10,
            "tune.space": yaml.safe_load(space), "tune.seed": 0, "tune.max_epochs": 4,
            "tune.max_failures": 0}
    sets.update(overrides)
    return folder_config(folder).replace(**sets)


def epochs_reported(trial_path: str) -> list[int]:
    lines = Path(trial_path, "result.json").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


def test_search_writes_every_output_and_survives_nan_trials(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", per_class=20, size=16)
    cfg = search_config(folder, """
        train.lr: {choice: [0.0001, 0.05, 1.0e+12]}
        model.arch:
          cnn: {model.filters: {choice: [[4], [8]]}, model.dense: 16}
          mlp: {model.units: {choice: [[16], [32]]}}
        """, **{"tune.num_samples": 8, "tune.max_concurrent_trials": 2,
                "tune.grace_period": 1, "tune.reduction_factor": 2})
    out = tmp_path / "search"
    result = run_search(cfg, out)

    table = read_trials(out / "trials.csv")
    assert table.equals(pd.read_parquet(out / "trials.parquet").astype(table.dtypes))
    assert len(table) == 8 and table["trial_id"].is_unique
    assert {"param.model.arch", "param.train.lr", "best_val_accuracy", "epochs_run",
            "asha_stopped", "status", "wall_s"} <= set(table.columns)
    # lr 1e-4 barely moves in 4 epochs of SGD, 0.05 solves the task, so the slow trials rank
    # below the fast ones at rung 1 and wait there until ASHA stops them.
    # Conditional parameters: each trial carries only its own architecture's.
    for _, row in table.iterrows():
        own = "param.model.filters" if row["param.model.arch"] == "cnn" else "param.model.units"
        other = "param.model.units" if own == "param.model.filters" else "param.model.filters"
        assert pd.notna(row[own]) and pd.isna(row.get(other))
    diverged = table[table["param.train.lr"] > 1]
    assert len(diverged) >= 1 and (diverged["status"] == "ERROR").all()
    assert diverged["error"].str.contains("loss is").all()
    assert (diverged["failure"] == "training").all() and table.loc[
        table["status"] != "ERROR", "failure"].isna().all()
    sane = table[table["param.train.lr"] < 1]
    assert len(sane) >= 2 and (sane["status"] == "TERMINATED").all()
    assert (sane["epochs_run"] <= 4).all()
    stopped = sane[sane["asha_stopped"]]
    assert len(stopped) >= 1 and (stopped["epochs_run"] < 4).all()
    assert (stopped["stopped_by"] == "asha").all()
    # ASHA with promotions (rungs at epochs 1 and 2), two trials at a time: every sane trial
    # is recorded at rung 1 although the limit is 2, exactly half of each rung goes on, and a
    # trial paused at a rung resumes from its checkpoint without repeating or skipping an epoch.
    rungs = json.loads((out / "asha_state.json").read_text())
    assert set(rungs["recorded"]["1"]) == set(sane["trial_id"])
    assert len(rungs["promoted"]["1"]) == max(1, len(sane) // 2)
    assert set(rungs["recorded"]["2"]) == set(rungs["promoted"]["1"]) == set(
        sane.loc[sane["epochs_run"] > 1, "trial_id"])
    assert set(rungs["promoted"]["2"]) == set(sane.loc[sane["epochs_run"] == 4, "trial_id"])
    assert len(rungs["promoted"]["2"]) == max(1, len(rungs["recorded"]["2"]) // 2)
    for _, row in sane.iterrows():
        assert epochs_reported(row["path"]) == list(range(1, row["epochs_run"] + 1))
        # Early stopping's counters carried on across each pause: they match the whole curve.
        latest = sorted(Path(row["path"]).glob("checkpoint_*/state.json"))[-1]
        state = json.loads(latest.read_text())
        losses = state["history"]["val_loss"]
        stopper = state["callbacks"]["EarlyStopping"]
        assert len(losses) == row["epochs_run"]
        assert stopper["best"] == pytest.approx(min(losses))
        assert stopper["wait"] == len(losses) - 1 - losses.index(min(losses))

    best = sane.sort_values("best_val_accuracy", ascending=False).iloc[0]
    assert result["best_trial"] == best["trial_id"]
    found = bundle.load(out / "best")
    assert found.metadata["search"]["trial_id"] == best["trial_id"]
    assert found.metrics["val_accuracy"] == pytest.approx(best["best_val_accuracy"])
    assert result["test_accuracy"] == pytest.approx(found.metrics["test_accuracy"], abs=1e-4)
    found.load_model()

    page = (out / "report" / "index.html").read_text()
    for image in ("trial_curves.png", "leaderboard.png", "best_confusion_matrix.png",
                  "best_samples.png", "best_learning_curves.png"):
        assert image in page and (out / "report" / image).stat().st_size > 5000
    for path in sane["path"]:
        assert list(Path(path, "logs").rglob("events.out.tfevents*")), path
    assert "search done: 8 trials" in capsys.readouterr().err


def test_the_last_trial_standing_trains_on_every_free_cpu(tmp_path):
    import ray

    folder = write_folder(tmp_path / "images", per_class=20, size=16)
    cfg = search_config(folder, "model.arch: {cnn: {model.filters: [4], model.dense: 8}}",
                        **{"tune.num_samples": 1, "tune.max_epochs": 6, "tune.grace_period": 1,
                           "tune.reduction_factor": 3})
    out = tmp_path / "search"
    run_search(cfg, out)
    row = read_trials(out / "trials.csv").iloc[0]
    lines = Path(row["path"], "result.json").read_text().splitlines()
    reports = [json.loads(line) for line in lines if line.strip()]
    # Rungs at epochs 1 and 3. Alone after epoch 4 with 2 epochs left, the trial restarts from
    # its checkpoint holding the node's CPUs, and sizes TensorFlow's threads to them.
    node_cpus = ray.nodes()[0]["Resources"]["CPU"]
    assert node_cpus >= 2, "this test needs a node with 2 CPUs or more"
    # (TensorFlow's own setting, read in the trial's process.)
    assert [(r["epoch"], r["cpus"], r["tf_threads"]) for r in reports] == [
        (1, 1.0, 1), (2, 1.0, 1), (3, 1.0, 1), (4, 1.0, 1), (5, node_cpus, int(node_cpus)),
        (6, node_cpus, int(node_cpus))]
    assert row["status"] == "TERMINATED" and row["epochs_run"] == 6


def test_rays_async_asha_decides_each_trial_against_earlier_arrivals(tmp_path):
    folder = write_folder(tmp_path / "images", per_class=20, size=16)
    cfg = search_config(folder, """
        train.lr: {choice: [0.0001, 0.05]}
        model.arch: {mlp: {model.units: [16]}}
        """, **{"tune.scheduler": "async_asha", "tune.num_samples": 6,
                "tune.max_concurrent_trials": 1, "tune.max_epochs": 3,
                "tune.grace_period": 1, "tune.reduction_factor": 2})
    out = tmp_path / "search"
    spans = tmp_path / "spans.jsonl"
    run_search(cfg, out, callbacks=[Spans(spans)])
    # tune.max_concurrent_trials 1: each trial starts after the one before it has stopped.
    events = [json.loads(line) for line in spans.read_text().splitlines()]
    by_pid = {e["pid"]: [x["t"] for x in events if x["pid"] == e["pid"]] for e in events}
    intervals = sorted((min(ts), max(ts)) for ts in by_pid.values())
    assert len(intervals) == 6
    assert all(later[0] > earlier[1] for earlier, later in zip(intervals, intervals[1:],
                                                                 strict=False))
    # So they run in trial-id order, and each is judged at rung 1 against those before it.
    table = read_trials(out / "trials.csv").sort_values("trial_id").reset_index(drop=True)
    assert len(table) == 6 and (table["status"] == "TERMINATED").all()
    assert table.loc[0, "epochs_run"] == 3  # the first arrival has nothing to lose against
    fast_seen = table["param.train.lr"].eq(0.05).cummax().shift(fill_value=False)
    late_slow = table[fast_seen & table["param.train.lr"].eq(0.0001)]
    assert len(late_slow) >= 1  # with this seed, a slow trial comes after a fast one
    assert (late_slow["epochs_run"] == 1).all() and (late_slow["stopped_by"] == "asha").all()
    assert (table["asha_stopped"] == (table["stopped_by"] == "asha")).all()
    for _, row in table.iterrows():
        assert epochs_reported(row["path"]) == list(range(1, row["epochs_run"] + 1))


class Spans:
    """Keras callback: append {pid, t} to `path` when training and each epoch begin."""

    def __new__(cls, path: Path):
        import os
        import time

        import keras

        def log():
            with open(path, "a") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "t": time.time()}) + "\n")

        class _Spans(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                log()

            def on_epoch_begin(self, index, logs=None):
                log()

        return _Spans()


class FailOnce:
    """Keras callback: raise at the start of `epoch` (0-based) the first time only."""

    def __new__(cls, marker: Path, epoch: int):
        import keras

        class _Fail(keras.callbacks.Callback):
            def on_epoch_begin(self, index, logs=None):
                if index == epoch and not marker.exists():
                    marker.write_text("failed once")
                    raise RuntimeError("injected worker failure")

        return _Fail()


def test_failed_trial_is_retried_from_its_checkpoint_and_tracked_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    folder = write_folder(tmp_path / "images", per_class=10, size=16)
    cfg = search_config(folder, "train.lr: {choice: [0.02, 0.03]}", **{
        "tune.num_samples": 2, "tune.scheduler": "none", "tune.max_failures": 1,
        "tune.mlflow.enabled": True})
    marker = tmp_path / "failed.txt"
    result = run_search(cfg, tmp_path / "out", callbacks=[FailOnce(marker, epoch=2)])
    assert marker.exists()
    table = read_trials(tmp_path / "out" / "trials.csv")
    assert (table["status"] == "TERMINATED").all() and (table["epochs_run"] == 4).all()
    # Epochs 1-2 ran, the failure hit epoch 3, the retry resumed at epoch 3: nothing repeated.
    for path in table["path"]:
        assert epochs_reported(path) == [1, 2, 3, 4]
    history = json.loads((tmp_path / "out" / "best" / "history.json").read_text())
    assert len(history["loss"]) == 4

    # MLflow, read back with its own client: the search is a parent run holding the result
    # and the best bundle; each trial a child run with its parameter and metrics per epoch.
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("clfsys")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == \
        result["best_trial"]
    assert parent.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "best")}
    assert {"best/model.keras", "best/metadata.json"} <= logged
    by_trial = {r.data.tags["clfsys.trial_id"]: r for r in children}
    assert set(by_trial) == set(table["trial_id"])
    for _, row in table.iterrows():
        run = by_trial[row["trial_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert float(run.data.params["train.lr"]) == row["param.train.lr"]
        curve = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in curve) == [1, 2, 3, 4]
        assert max(m.value for m in curve) == pytest.approx(row["best_val_accuracy"])


def test_bad_space_fails_before_ray_starts(tmp_path):
    from clfsys.errors import ConfigError

    folder = write_folder(tmp_path / "images", per_class=3, size=16)
    cfg = search_config(folder, "train.learning_rate: {choice: [0.1]}")
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        run_search(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failures_are_told_apart_training_from_infrastructure():
    import ray.exceptions as rex

    from clfsys.results import failure_kind
    from clfsys.storage import StorageError

    def raised_in_a_trial(exc):
        return rex.RayTaskError("_trial", "Traceback ...", exc).as_instanceof_cause()

    assert failure_kind(raised_in_a_trial(FloatingPointError("loss is nan"))) == "training"
    assert failure_kind(raised_in_a_trial(ValueError("bad shape"))) == "training"
    assert failure_kind(rex.ActorDiedError()) == "infrastructure"
    assert failure_kind(rex.NodeDiedError("node lost")) == "infrastructure"
    assert failure_kind(raised_in_a_trial(OSError("s3: connection refused"))) == \
        "infrastructure"
    assert failure_kind(raised_in_a_trial(StorageError("s3://b/k: timeout"))) == \
        "infrastructure"


def test_local_storage_is_refused_when_trials_must_run_on_other_nodes(tmp_path):
    """This node has no GPU, so GPU trials would run on nodes an autoscaler adds: a local
    storage path cannot serve them, and the search is refused before any trial starts."""
    from clfsys.errors import ConfigError

    folder = write_folder(tmp_path / "images", per_class=6)
    cfg = folder_config(folder, **{"tune.resources.gpu": 1, "tune.num_samples": 1})
    with pytest.raises(ConfigError, match=r"tune.storage_path \(default <out>/ray\) is .*a "
                                          r"local path, but this node has too little GPU"):
        run_search(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "ray" / "search").exists()


CONDITIONAL = """
    train.lr: {loguniform: [0.005, 0.05]}
    model.arch:
      cnn: {model.filters: {choice: [[4], [8]]}, model.dense: 16}
      mlp: {model.units: {choice: [[16], [32]]}}
    """


def test_tpe_learns_from_rungs_and_a_warm_started_search_builds_on_its_trials(tmp_path, capfd):
    """1. Optuna under the default scheduler, PromotingASHA, which parks new trials: Tune used
    to take every configuration from the searcher before any trial had a result, so TPE chose
    none of them. Now each is chosen when the one before it starts. One trial at a time, one
    start-up trial: the 3rd is chosen by TPE once the 1st waits at the rung (epoch 1) and the
    2nd has started; no trial has completed yet. (Conditional parameters used to be named
    <arch>/<key>, which Tune flattens on: Optuna failed at once.)
    2. A search warm-started from it, in an lr range that leaves one earlier trial out: the two
    inside are told to TPE, the one outside is named, and the best inside goes on from its
    checkpoint, its epochs continuing where the earlier search left it; tune.select picks the
    most accurate trial within its limit."""
    folder = write_folder(tmp_path / "images", per_class=10, size=16)
    cfg = search_config(folder, CONDITIONAL, **{
        "tune.searcher": "optuna", "tune.startup_trials": 1, "tune.num_samples": 3,
        "tune.max_epochs": 3, "tune.grace_period": 1, "tune.reduction_factor": 3,
        "tune.max_concurrent_trials": 1, "tune.seed": 3})
    assert cfg.tune.scheduler == "asha"
    result = run_search(cfg, tmp_path / "first")
    chosen = [line for line in capfd.readouterr().err.splitlines()
              if line.startswith("optuna: trial ")]
    first = read_trials(tmp_path / "first" / "trials.csv")
    assert result["trials"] == len(first) == len(chosen) == 3, chosen
    assert [line.split(" chosen by ")[1] for line in chosen] == [
        "random start-up from 0 completed, 0 stopped early, 0 under way",
        "random start-up from 0 completed, 0 stopped early, 0 under way",
        "TPE from 0 completed, 0 stopped early, 1 under way"], chosen
    assert sorted(line.split()[2] for line in chosen) == sorted(first["trial_id"])
    assert (first["stopped_by"] == "asha").sum() == 2, first.to_string()
    # Every trial measured what its model costs to serve, and carries its own architecture's
    # parameter.
    assert (first[["ms_per_image_b1", "ms_per_image_b32", "model_mb"]] > 0).all().all()
    assert (first["params"] > 0).all()
    for _, row in first.iterrows():
        own = "param.model.filters" if row["param.model.arch"] == "cnn" else "param.model.units"
        assert pd.notna(row[own]), row.to_dict()

    narrow = yaml.safe_load(CONDITIONAL)
    cut = sorted(first["param.train.lr"])[1]  # the two lowest are inside
    narrow["train.lr"] = {"loguniform": [0.005, float(cut)]}
    limit = int(first["params"].max())
    cfg = cfg.replace(**{"tune.space": narrow, "tune.num_samples": 2, "tune.max_epochs": 5,
                         "tune.warm_start.path": str(tmp_path / "first"),
                         "tune.warm_start.continue_top": 1, "tune.select.max_params": limit})
    result = run_search(cfg, tmp_path / "second")
    err = capfd.readouterr().err
    inside = first[first["param.train.lr"] <= cut]
    assert result["warm_start"] == {"from": str(tmp_path / "first"), "earlier_trials": 3,
                                    "used": 2, "outside_space": 1, "continued": 1}, err[-3000:]
    assert "optuna: told 2 earlier trials" in err
    top = inside.sort_values(["best_val_accuracy", "epochs_run", "trial_id"],
                             ascending=[False, False, True]).iloc[0]
    second = read_trials(tmp_path / "second" / "trials.csv")
    went_on = second[second["continued_from"] == top["trial_id"]]
    assert len(went_on) == 1, second.to_string()
    epochs = [json.loads(line)["epoch"] for line in
              (Path(went_on.iloc[0]["path"]) / "result.json").read_text().splitlines()]
    assert epochs == list(range(top["epochs_run"] + 1, epochs[-1] + 1)), epochs
    assert went_on.iloc[0]["param.train.lr"] == top["param.train.lr"]
    # Selection under tune.select: the most accurate trial within the limit.
    ranked = second.sort_values("best_val_accuracy", ascending=False, kind="stable")
    allowed = ranked[ranked["params"] <= limit]
    assert (second["meets_select"] == (second["params"] <= limit)).all()
    assert result["best_trial"] == allowed.iloc[0]["trial_id"]
    ahead = ranked.index.get_loc(allowed.index[0])
    assert result["ruled_out"] == ({"params": ahead} if ahead else {})
    page = (tmp_path / "second" / "report" / "index.html").read_text()
    assert "2 inside this space and told to the searcher" in page
    (outside,) = set(first["trial_id"]) - set(inside["trial_id"])
    assert f"<td>{outside}</td><td>train.lr=" in page  # named with the key
    assert (tmp_path / "second" / "report" / "accuracy_vs_latency.png").stat().st_size > 5000


@needs_fashion_mnist()
@pytest.mark.parametrize("scheduler, searcher", [("asha", "random"), ("async_asha", "optuna")])
def test_a_time_budget_on_the_default_search_writes_every_output(tmp_path, scheduler, searcher):
    """The default job (jobs/fashion_mnist.yaml) stopped by a budget that leaves trials waiting.
    Under the default `asha`, PromotingASHA parks new trials until it chooses them; Tune's
    closing report used to raise on the ones it never started, losing the whole search.

    The budget counts from the search's start. Here the first trials end their first epoch
    about 12 s after it (each trial's process imports TensorFlow), and once, with a cold page
    cache, not within 15 s: hence 25 s. 12 samples, 2 at a time, cannot all start in it."""
    from clfsys.config import load_config

    cfg = load_config(ROOT / "jobs" / "fashion_mnist.yaml", [
        "data.limit=300", "tune.num_samples=12", "tune.max_epochs=3",
        "tune.time_budget_s=25", f"tune.scheduler={scheduler}", f"tune.searcher={searcher}"])
    result = run_search(cfg, tmp_path / "out")
    table = read_trials(tmp_path / "out" / "trials.csv")
    assert table["trial_id"].is_unique and result["trials"] == len(table)
    ran = table[table["epochs_run"] > 0]
    pending = table[table["status"] == "NOT_STARTED"]
    assert len(ran) >= 1 and (table["status"] != "ERROR").all(), table.to_string()
    assert result["not_started"] == len(pending)
    if searcher == "random":  # all 12 are sampled up front; 2 run at a time
        assert len(table) == 12 and len(pending) >= 1, table.to_string()
        assert pending["param.model.filters"].notna().all()
        assert pending["param.train.lr"].notna().all()
        assert pending["best_val_accuracy"].isna().all()
    best = bundle.load(tmp_path / "out" / "best")
    assert best.metadata["search"]["trial_id"] in set(ran["trial_id"])
    assert (tmp_path / "out" / "report" / "index.html").is_file()
    assert (tmp_path / "out" / "trials.parquet").is_file()
