"""Architecture and learning-rate search on Ray Tune.

A trial is `train()` with the sampled overrides and a Keras callback that reports every epoch to
Tune with a checkpoint (the latest model for retries, the best model so far, the epoch and the
history). ASHA stops weak trials across the search; Keras EarlyStopping stops each trial from
inside. Selection uses validation accuracy only; the test split is touched once, by the best
model, when its bundle is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clfsys import checkpoints, storage
from clfsys import data as data_mod
from clfsys.cluster import init_ray
from clfsys.config import Config
from clfsys.errors import ConfigError, DataError
from clfsys.space import CONTINUE_KEY, Param, check_space, parse_space, trial_config

EXPERIMENT = "search"
METRIC = "val_accuracy"


# --- inside a trial (a Ray worker process) ---------------------------------------------------


def _reporter_class():
    import keras
    from ray import tune

    class TuneReporter(keras.callbacks.Callback):
        """Reports each epoch to Tune with a checkpoint; fails the trial on a NaN loss."""

        def __init__(self, state: dict[str, Any], scratch: Path, cpus: float):
            super().__init__()
            self.state = state
            self.scratch = scratch
            self.cpus = cpus

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise FloatingPointError(
                    f"loss is {float(loss)} at epoch {self.state['epoch'] + 1}, batch {batch + 1}")

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            state = self.state
            state["epoch"] = epoch + 1
            for key, value in logs.items():
                state["history"].setdefault(key, []).append(value)
            if not math.isfinite(logs.get("loss", 0.0)):
                raise FloatingPointError(f"loss is {logs['loss']} at epoch {epoch + 1}")
            best = self.scratch / "best.keras"
            if state["best_val_accuracy"] is None or logs[METRIC] > state["best_val_accuracy"]:
                state["best_val_accuracy"] = logs[METRIC]
                state["best_epoch"] = epoch + 1
                self.model.save(best)
            with tempfile.TemporaryDirectory(prefix="clfsys-ckpt-") as folder:
                self.model.save(Path(folder) / "model.keras")
                if "cost" not in state:  # the architecture's serving cost, once per trial
                    state["cost"] = self.serving_cost(Path(folder) / "model.keras")
                shutil.copy(best, Path(folder) / "best.keras")
                self._report(logs, bool(self.model.stop_training), Path(folder))

        def report_again(self, restored: Path) -> None:
            """Report the restored checkpoint's last epoch once more, with a copy of it."""
            logs = {key: values[-1] for key, values in self.state["history"].items()}
            with tempfile.TemporaryDirectory(prefix="clfsys-ckpt-") as folder:
                shutil.copytree(restored, folder, dirs_exist_ok=True)
                self._report(logs, False, Path(folder))

        def _report(self, logs: dict[str, float], keras_stopped: bool, folder: Path) -> None:
            state = self.state
            (folder / "state.json").write_text(json.dumps(state))
            tune.report({
                **logs, "epoch": state["epoch"], "best_val_accuracy": state["best_val_accuracy"],
                "keras_stopped": keras_stopped, **state["cost"], **_placement(),
                "cpus": self.cpus, "tf_threads": _tf_threads(),
            }, checkpoint=tune.Checkpoint.from_directory(folder))

        def serving_cost(self, saved: Path) -> dict[str, Any]:
            from clfsys.predict import serving_cost

            cost = serving_cost(self.model, tuple(self.model.input_shape[1:]))
            return {**cost, "model_mb": round(saved.stat().st_size / 1e6, 3)}

    return TuneReporter


def _placement() -> dict[str, Any]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}


def _tf_threads() -> int:
    """The compute threads TensorFlow was set to use in this process."""
    import tensorflow as tf

    return tf.config.threading.get_intra_op_parallelism_threads()


def _configure_tensorflow(cpus: float) -> None:
    """Threads to match the trial's CPUs; GPU memory growth so fractional GPUs share a card."""
    import tensorflow as tf

    from clfsys.predict import configure_gpu_memory_growth

    threads = max(1, int(cpus))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:  # TF already initialised in this process
        pass
    configure_gpu_memory_growth()


def _trial(sample: dict[str, Any], base: Config, dataset, callbacks: Sequence[Any] = (),
           deadline: float | None = None) -> None:
    """One trial. `base` is the search's Config, already set to train for tune.max_epochs
    quietly; `sample` is the dict Tune sampled from the search space (Tune's searchers and
    schedulers work on dicts), turned into this trial's Config once. `deadline` is when the
    search's time budget ends, if the cosine decay is to fit it."""
    from ray import tune

    from clfsys.train import load_to_resume, train

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cfg = trial_config(base, sample)
    continue_from = sample.get(CONTINUE_KEY)
    # The trial's own CPUs: the scheduler may have grown them (PromotingASHA's last trial).
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1.0)
    _configure_tensorflow(cpus)
    scratch = Path(tempfile.mkdtemp(prefix="clfsys-trial-"))
    state: dict[str, Any] = {"epoch": 0, "history": {}, "best_val_accuracy": None,
                             "best_epoch": 0}
    reporter = _reporter_class()(state, scratch, cpus)
    model = None
    try:
        # A trial restarted by a resumed search resumes from its newest whole checkpoint, also
        # when the one Tune recorded is gone (see raykit.restore_only_whole) or Tune's state
        # was saved before it recorded any. A trial that continues an earlier search's trial
        # starts from that one's checkpoint.
        checkpoint = tune.get_checkpoint() or checkpoints.newest_whole()
        earlier = checkpoint is None and continue_from
        if earlier:
            checkpoint = checkpoints.at_location(continue_from)
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state.update(json.loads((Path(folder) / "state.json").read_text()))
                if earlier:  # its cosine may have been fitted to the earlier search's budget
                    state.get("callbacks", {}).pop("CosineDecay", None)
                shutil.copy(Path(folder) / "best.keras", scratch / "best.keras")
                if state["epoch"] >= cfg.train.epochs:
                    # It had finished when a killed driver had not yet recorded the end: the
                    # last epoch is reported again, so that the search's record holds it.
                    reporter.report_again(Path(folder))
                    return
                model = load_to_resume(Path(folder) / "model.keras", cfg, state["epoch"])
            print(f"resuming from checkpoint at epoch {state['epoch']}", file=sys.stderr)
        # Early stopping's patience and the LR plateau's counter carry on across a pause at
        # a rung: their state travels in state.json with the checkpoint.
        train(cfg, dataset=dataset, work_dir=tune.get_context().get_trial_dir(),
              callbacks=[reporter, *callbacks], model=model, initial_epoch=state["epoch"],
              callback_state=state.setdefault("callbacks", {}), deadline=deadline)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- on the driver ---------------------------------------------------------------------------


def _domain(param: Param):
    from ray import tune

    if param.kind == "fixed":
        return param.args[0]
    if param.kind == "choice":
        return tune.choice(list(param.args))
    if param.kind == "uniform":
        return tune.uniform(*param.args)
    if param.kind == "loguniform":
        return tune.loguniform(*param.args)
    return tune.randint(param.args[0], param.args[1] + 1)  # inclusive bounds


def _scheduler(cfg: Config, out: str):
    from ray.tune.schedulers import FIFOScheduler

    from clfsys.raykit import free_cpus_per_node
    from clfsys.scheduler import STATE_FILE, PromotingASHA, RecordingASHA

    t = cfg.tune
    if t.scheduler == "none":
        return FIFOScheduler()
    state_file = storage.join(out, STATE_FILE)
    if t.scheduler == "asha":
        return PromotingASHA(metric="best_val_accuracy", mode="max", time_attr="epoch",
                             max_t=t.max_epochs, grace_period=t.grace_period,
                             reduction_factor=t.reduction_factor, state_file=state_file,
                             max_concurrent=t.max_concurrent_trials, node_room=free_cpus_per_node)
    return RecordingASHA(time_attr="epoch", max_t=t.max_epochs, grace_period=t.grace_period,
                         reduction_factor=t.reduction_factor, state_file=state_file)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def storage_root(cfg: Config, out: str) -> str:
    """Where the search keeps what its trials share: the experiment and the decoded cache."""
    return cfg.tune.storage_path or storage.join(out, "ray")


def experiment_path(cfg: Config, out: str) -> str:
    return storage.join(storage_root(cfg, out), EXPERIMENT)


NEEDED_FOR = {"tune.storage_path": "checkpoint or resume", "data.cache_path": "read their data",
              "tune.warm_start.path": "read the earlier trials' checkpoints"}


def check_storage_reaches_every_node(cfg: Config, path: str,
                                     key: str = "tune.storage_path") -> None:
    """Refuse, before any trial starts, a search whose trials could not all reach `path`, the
    folder `key` names: a local path when trials run on other nodes than this one (the cluster
    has several, or this node cannot host a trial, so an autoscaler will add others), unless
    declared shared."""
    import ray

    if storage.is_uri(path) or cfg.tune.storage_shared:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    own = next((n.get("Resources", {}) for n in nodes if n["NodeID"] == here), {})
    need = {"CPU": cfg.tune.resources.cpu, "GPU": cfg.tune.resources.gpu}
    short = [k for k, v in need.items() if v and own.get(k, 0) < v]
    if len(nodes) <= 1 and not short:
        return
    why = (f"the cluster has {len(nodes)} nodes" if len(nodes) > 1 else
           f"this node has too little {' and '.join(short)} for a trial, so trials run on "
           "other nodes")
    where = key + ("" if key != "tune.storage_path" or cfg.tune.storage_path
                   else " (default <out>/ray)")
    raise ConfigError(
        f"{where} is {path}, a local path, but {why}: they could not {NEEDED_FOR[key]} there; "
        f"set {key}=s3://BUCKET/PREFIX (or gs://...), or tune.storage_shared=true if that "
        "path is a mount every node shares (NFS)")


def run_search(cfg: Config, out_dir: str | Path, *, resume: bool = False,
               callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run (or resume) the search; write trials.csv/.parquet, best/ and report/ to `out_dir`
    (a local path or a URI).

    `callbacks` are extra Keras callbacks run inside every trial.
    """
    # Checkpointing every epoch is intended; Tune's advice to checkpoint less is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray import tune

    from clfsys.raykit import restore_only_whole
    from clfsys.scheduler import TrialDirs

    params = parse_space(cfg.tune.space)
    check_space(cfg, params)
    out = storage.normalize(out_dir)
    path = experiment_path(cfg, out)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise DataError(f"nothing to resume at {path}: no search state found")
    elif storage.list_files(out):
        raise DataError(f"--out {out_dir} is not empty; pass --resume to continue the search "
                        "there, or choose a new directory")
    warm, continued = None, []
    if cfg.tune.warm_start.path:
        from clfsys import warm_start

        warm = warm_start.load(cfg.tune.warm_start.path, params, cfg)
    if warm is not None and not resume:  # a resumed search's searcher has them already
        continued = warm_start.best(warm, cfg.tune.warm_start.continue_top)
        if len(continued) < cfg.tune.warm_start.continue_top:
            raise DataError(
                f"tune.warm_start.continue_top is {cfg.tune.warm_start.continue_top}, but only "
                f"{len(continued)} earlier trial(s) inside this space have a checkpoint column "
                f"in {warm.source}/trials.parquet")
        checkpoints.check_whole([e.checkpoint for e in continued])
    staging = Path(storage.staging_dir(out))
    staging.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # A folder past data.memory_budget_mb is decoded once into shards beside the experiment,
    # where every trial on every node reads them.
    dataset = data_mod.load(cfg.data, cache_root=storage.join(storage_root(cfg, out), "decoded"))
    print(f"data: {dataset.summary()}", file=sys.stderr)
    tracking = None
    if cfg.tune.mlflow.enabled:
        from clfsys.tracking import SearchRun

        tracking = SearchRun(cfg, out, path)
    init_ray()
    check_storage_reaches_every_node(cfg, storage_root(cfg, out))
    if warm is not None and cfg.tune.warm_start.continue_top:
        check_storage_reaches_every_node(cfg, warm.source, "tune.warm_start.path")
    if dataset.train_shards is not None and cfg.data.cache_path:
        check_storage_reaches_every_node(cfg, dataset.train_shards.location.rsplit("/", 1)[0],
                                         "data.cache_path")
    resources = {"cpu": cfg.tune.resources.cpu, "gpu": cfg.tune.resources.gpu}
    base = cfg.replace(**{"train.epochs": cfg.tune.max_epochs, "train.verbose": 0})
    # Tune counts the budget from a little later (its first step), and a resumed search's anew.
    deadline = (time.time() + cfg.tune.time_budget_s
                if cfg.tune.time_budget_s and cfg.tune.fit_decay_to_budget else None)
    trainable = tune.with_resources(restore_only_whole(
        tune.with_parameters(_trial, base=base, dataset=dataset, callbacks=list(callbacks),
                             deadline=deadline),
        checkpoints.recorded_is_whole), resources)
    if resume:
        # Tune restores the searcher and scheduler it saved when the search began.
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        from clfsys.searchers import make_searcher

        scheduler = _scheduler(cfg, out)
        tuner = tune.Tuner(
            trainable,
            param_space={p.name: _domain(p) for p in params},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=cfg.tune.num_samples,
                search_alg=make_searcher(cfg, getattr(scheduler, "wants_configuration", None),
                                         warm, continued),
                scheduler=scheduler,
                time_budget_s=cfg.tune.time_budget_s, reuse_actors=False,
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=path.rsplit("/", 1)[0],
                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                # TensorBoard logs and other files of each trial reach the storage too.
                sync_config=tune.SyncConfig(sync_artifacts=True), verbose=1,
                callbacks=[TrialDirs(), *([tracking.callback()] if tracking else [])]),
        )
    grid = tuner.fit()
    from clfsys.results import write_outputs

    try:
        result = write_outputs(grid, cfg, dataset, out, staging, experiment=path, warm=warm,
                               wall_s=time.perf_counter() - started)
    except Exception:
        if tracking:
            tracking.fail()
        raise
    if tracking:
        tracking.finish(result)
    return result
