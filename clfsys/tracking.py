"""Experiment tracking in MLflow (optional: `pip install 'clfsys[mlflow]'`, `tune.mlflow`).

A search is one parent run; each trial is a child run (tag mlflow.parentRunId) holding the
trial's sampled parameters and its metrics per epoch (step = epoch). When the search ends, the
best bundle is logged as artifacts of the parent run (`best/`) with its test metrics.

Everything is logged from the driver by a Tune callback, so a tracking store on the driver's
disk is fine on a cluster. The default store is SQLite under a local --out (`mlflow.db`, with
artifacts in `mlartifacts/`): MLflow 3.17 refuses its old `./mlruns` file store. A resumed
search finds its parent run and its trials' runs again by their tags and goes on logging there.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from clfsys import storage
from clfsys.config import Config
from clfsys.errors import ConfigError

SEARCH_TAG = "clfsys.search"
TRIAL_TAG = "clfsys.trial_id"


def tracking_uri(cfg: Config, out: str) -> str:
    """tune.mlflow.tracking_uri, or the SQLite store under a local --out."""
    if cfg.tune.mlflow.tracking_uri:
        return cfg.tune.mlflow.tracking_uri
    if not storage.is_local(out):
        raise ConfigError(
            f"tune.mlflow.tracking_uri: --out is {out}, not a local folder, so there is no "
            "default MLflow store; set it to your tracking server (http://...) or a "
            "sqlite:////path/on/the/driver.db")
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("tune.mlflow.enabled needs MLflow: pip install 'clfsys[mlflow]'") \
            from None
    return MlflowClient(uri)


class SearchRun:
    """The parent run of one search (created, or found again when the search resumes)."""

    def __init__(self, cfg: Config, out: str, experiment_path: str):
        self.uri = tracking_uri(cfg, out)
        self.client = _client(self.uri)
        name = cfg.tune.mlflow.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            artifacts = (str(Path(out).resolve() / "mlartifacts")
                         if not cfg.tune.mlflow.tracking_uri else None)
            self.experiment_id = self.client.create_experiment(name, artifacts)
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`{SEARCH_TAG}` = '{experiment_path}'")
        if runs:
            self.run_id = runs[0].info.run_id
        else:
            self.run_id = self.client.create_run(
                self.experiment_id, run_name=f"search {Path(experiment_path).parent.name}",
                tags={SEARCH_TAG: experiment_path}).info.run_id
            self.client.log_dict(self.run_id, cfg.to_dict(), "config.json")
        print(f"MLflow: run {self.run_id} in experiment {name!r} at {self.uri}",
              file=sys.stderr)

    def callback(self):
        """The Tune callback that logs each trial as a child run of this one."""
        return _trial_logger(self.uri, self.experiment_id, self.run_id)

    def finish(self, result: dict[str, Any]) -> None:
        """Log the search's result line and its best bundle (artifacts under best/)."""
        for key, value in result.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.client.log_metric(self.run_id, key, float(value))
        self.client.set_tag(self.run_id, "best_trial", result["best_trial"])
        self.client.set_tag(self.run_id, "best_bundle", result["bundle"])
        with tempfile.TemporaryDirectory(prefix="clfsys-mlflow-") as scratch:
            bundle = result["bundle"]
            if not storage.is_local(bundle):
                storage.copy_tree(bundle, scratch)
                bundle = scratch
            self.client.log_artifacts(self.run_id, bundle, "best")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


def _trial_logger(uri: str, experiment_id: str, parent_id: str):
    from ray.tune import Callback

    from clfsys.space import overrides

    class TrialLogger(Callback):
        """One MLflow child run per trial: its parameters once, its metrics every epoch."""

        def setup(self, **info):
            self.client = _client(uri)
            found = self.client.search_runs(
                [experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                max_results=10000)
            self.runs = {r.data.tags[TRIAL_TAG]: r.info.run_id for r in found
                         if TRIAL_TAG in r.data.tags}

        def _run(self, trial) -> str:
            if trial.trial_id not in self.runs:
                run = self.client.create_run(experiment_id, run_name=f"trial_{trial.trial_id}",
                                             tags={"mlflow.parentRunId": parent_id,
                                                   TRIAL_TAG: trial.trial_id})
                self.runs[trial.trial_id] = run.info.run_id
                for key, value in overrides(trial.config).items():
                    self.client.log_param(run.info.run_id, key, value)
            return self.runs[trial.trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            from mlflow.entities import Metric

            step = int(result.get("epoch", 0))
            stamp = int(1000 * result.get("timestamp", 0))
            metrics = [Metric(key, float(value), stamp, step) for key, value in result.items()
                       if isinstance(value, int | float) and not isinstance(value, bool)
                       and math.isfinite(value) and key not in ("pid", "timestamp")]
            self.client.log_batch(self._run(trial), metrics=metrics)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.client.set_terminated(self._run(trial), "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.client.set_terminated(self._run(trial), "FAILED")

    return TrialLogger()
