"""The `tune` section of the job config: how `clfsys tune` searches (searcher, scheduler,
budget, the space) and the sections inside it (a trial's resources, the constraints the best
bundle must meet, MLflow tracking). Like config.py: frozen dataclasses whose errors name the
dotted key; no TensorFlow or Ray import here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clfsys.options import check, option

SEARCHERS = ("random", "optuna")
SCHEDULERS = ("asha", "async_asha", "none")
LATENCY_BATCHES = (1, 32)


@dataclass(frozen=True)
class ResourcesConfig:
    """Resources of one trial; fractional GPUs share a card (TF memory growth is on)."""

    cpu: float = option(1.0, "CPUs per trial.")
    gpu: float = option(0.0, "GPUs per trial; fractions share a card (TensorFlow memory growth is "
                             "on).")

    def __post_init__(self) -> None:
        check(self.cpu > 0, "tune.resources.cpu", "must be > 0", self.cpu)
        check(self.gpu >= 0, "tune.resources.gpu", "must be >= 0", self.gpu)


@dataclass(frozen=True)
class SelectConfig:
    """Constraints the best bundle must meet, on costs every trial measures on its own device
    (trials.csv: ms_per_image_b1, ms_per_image_b32, params, model_mb). The best bundle is the
    most accurate trial that meets them all; unset, accuracy alone decides."""

    max_latency_ms: float | None = option(None, "At most this many milliseconds per image at batch"
                                                " size `latency_batch`.")
    latency_batch: int = option(1, "Which measured latency `max_latency_ms` limits: 1 (one "
                                   "request) or 32 (batched).")
    max_params: int | None = option(None, "At most this many model parameters.")
    max_model_mb: float | None = option(None, "At most this large a model.keras, in MB.")

    def __post_init__(self) -> None:
        for key in ("max_latency_ms", "max_params", "max_model_mb"):
            value = getattr(self, key)
            if value is not None:
                check(value > 0, f"tune.select.{key}", "must be > 0", value)
        check(self.latency_batch in LATENCY_BATCHES, "tune.select.latency_batch",
              f"must be one of {list(LATENCY_BATCHES)}", self.latency_batch)

    def limits(self) -> dict[str, float]:
        """trials.csv column -> the largest value allowed there."""
        columns = {"max_latency_ms": f"ms_per_image_b{self.latency_batch}",
                   "max_params": "params", "max_model_mb": "model_mb"}
        return {column: getattr(self, key) for key, column in columns.items()
                if getattr(self, key) is not None}


@dataclass(frozen=True)
class MlflowConfig:
    """Experiment tracking in MLflow (needs `pip install 'clfsys[mlflow]'`)."""

    enabled: bool = option(False, "Log the search as a parent run, each trial as a child run, the "
                                  "best bundle as artifacts.")
    tracking_uri: str | None = option(None, "Tracking server or store; default "
                                            "sqlite:///<out>/mlflow.db (a local --out only).")
    experiment: str = option("clfsys", "MLflow experiment name.")

    def __post_init__(self) -> None:
        check(bool(self.experiment), "tune.mlflow.experiment", "must not be empty",
              self.experiment)


@dataclass(frozen=True)
class WarmStartConfig:
    """Start from an earlier search (`clfsys tune --warm-start PREVIOUS_OUT`)."""

    path: str | None = option(None, "The earlier search's --out (a local path or a URI): its "
                                    "trials inside this space are told to the searcher, and "
                                    "none is sampled again.")
    continue_top: int = option(0, "Continue the K most accurate earlier trials from their "
                                  "checkpoints, up to this search's max_epochs (they count "
                                  "towards num_samples).")

    def __post_init__(self) -> None:
        check(self.continue_top >= 0, "tune.warm_start.continue_top", "must be >= 0",
              self.continue_top)
        check(not self.continue_top or bool(self.path), "tune.warm_start.continue_top",
              "needs tune.warm_start.path (--warm-start)", self.continue_top)


@dataclass(frozen=True)
class TuneConfig:
    """Architecture / learning-rate search on Ray Tune (`clfsys tune`)."""

    space: dict[str, Any] = option({}, "Search space: dotted config key -> "
                                       "{choice|uniform|loguniform|randint: ...} or a value; "
                                       "`model.arch` maps each architecture to its own "
                                       "(conditional) parameters.")
    searcher: str = option("random", "random (seeded) or optuna (TPE).")
    num_samples: int = option(12, "Trials to sample.")
    max_concurrent_trials: int | None = option(None, "At most this many trials at once (default: "
                                                     "as many as resources allow).")
    time_budget_s: float | None = option(None, "Stop starting and running trials after this many "
                                               "seconds.")
    fit_decay_to_budget: bool = option(True, "With tune.time_budget_s and train.lr_decay "
                                             "cosine: each trial's cosine ends at the last "
                                             "epoch that fits in the budget when fewer fit than "
                                             "tune.max_epochs, instead of being cut off at a "
                                             "high learning rate.")
    seed: int = option(0, "Seed of the searcher.")
    startup_trials: int | None = option(None, "optuna: configurations sampled at random before "
                                              "TPE models the results; default a third of "
                                              "num_samples, between 2 and 10 (Optuna's own "
                                              "default is 10).")
    scheduler: str = option("asha", "asha (pause trials at rungs, promote the top "
                                    "1/reduction_factor), async_asha (Ray's "
                                    "AsyncHyperBandScheduler: decide at each rung on arrival) or "
                                    "none (all run to max_epochs).")
    max_epochs: int = option(12, "Epochs per trial at most (replaces train.epochs).")
    grace_period: int = option(2, "ASHA: epochs every trial gets before it may be stopped.")
    reduction_factor: int = option(3, "ASHA: keep the top 1/reduction_factor at each rung.")
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    max_failures: int = option(1, "Retries of a failed trial, resumed from its last checkpoint.")
    storage_path: str | None = option(None, "Where Tune keeps trial state, checkpoints and each "
                                            "trial's logs: storage every node reaches (s3://..., "
                                            "gs://...) on a multi-node cluster; default <out>/ray.")
    storage_shared: bool = option(False, "Declare a local tune.storage_path shared by every node "
                                         "(an NFS mount); without it, a local path is refused on a"
                                         " cluster of more than one node.")
    select: SelectConfig = field(default_factory=SelectConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    @property
    def tpe_startup(self) -> int:
        """Configurations sampled at random before TPE chooses (tune.startup_trials)."""
        if self.startup_trials is not None:
            return self.startup_trials
        return min(10, max(2, self.num_samples // 3))

    def __post_init__(self) -> None:
        check(self.searcher in SEARCHERS, "tune.searcher", f"must be one of {list(SEARCHERS)}",
              self.searcher)
        check(self.scheduler in SCHEDULERS, "tune.scheduler",
              f"must be one of {list(SCHEDULERS)}", self.scheduler)
        check(self.num_samples > 0, "tune.num_samples", "must be > 0", self.num_samples)
        if self.startup_trials is not None:
            check(self.startup_trials >= 1, "tune.startup_trials", "must be >= 1",
                  self.startup_trials)
        if self.max_concurrent_trials is not None:
            check(self.max_concurrent_trials > 0, "tune.max_concurrent_trials", "must be > 0",
                  self.max_concurrent_trials)
        if self.time_budget_s is not None:
            check(self.time_budget_s > 0, "tune.time_budget_s", "must be > 0",
                  self.time_budget_s)
        check(self.max_epochs > 0, "tune.max_epochs", "must be > 0", self.max_epochs)
        check(1 <= self.grace_period <= self.max_epochs, "tune.grace_period",
              "must be between 1 and tune.max_epochs", self.grace_period)
        check(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2",
              self.reduction_factor)
        check(self.max_failures >= 0, "tune.max_failures", "must be >= 0", self.max_failures)
        check(self.warm_start.continue_top <= self.num_samples, "tune.warm_start.continue_top",
              f"must be <= tune.num_samples ({self.num_samples})", self.warm_start.continue_top)
