"""Plain Keras training and evaluation. Knows nothing of Ray.

`train()` fits the configured model with early stopping, a best-model checkpoint and TensorBoard
logs; `evaluate()` scores a model on arrays; `publish()` evaluates on the held-out test split,
draws the plots and writes the model bundle.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from clfsys import cache
from clfsys import data as data_mod
from clfsys.config import Config, TrainConfig
from clfsys.dataset import Dataset
from clfsys.models import BACKBONE_LAYER, BACKBONES, build_model


@dataclass
class TrainResult:
    model: Any
    history: dict[str, list[float]]
    dataset: Dataset
    config: Config
    epochs_run: int
    best_epoch: int
    """1-based epoch whose weights the model holds (the best by `train.monitor`)."""
    stopped_early: bool
    wall_s: float
    initial_epoch: int = 0
    """Epochs done before this run (the history starts after them)."""

    @property
    def best_val_accuracy(self) -> float:
        return float(self.history["val_accuracy"][self.best_epoch - 1 - self.initial_epoch])


def make_optimizer(cfg: TrainConfig):
    import keras

    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(learning_rate=cfg.lr)


def compile_model(model, cfg: TrainConfig, lr: float | None = None) -> None:
    model.compile(optimizer=make_optimizer(cfg if lr is None else replace(cfg, lr=lr)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def training_callbacks(tc: TrainConfig, work_dir: str | Path | None = None) -> list[Any]:
    """Early stopping, the LR plateau schedule (if configured) and, with a `work_dir`, the
    best-model checkpoint: the callbacks whose counters `state_keeper` carries over a pause."""
    import keras

    patience = tc.patience if tc.early_stopping else tc.epochs
    callbacks: list[Any] = [keras.callbacks.EarlyStopping(
        monitor=tc.monitor, patience=patience, restore_best_weights=tc.restore_best_weights)]
    if tc.lr_plateau_patience:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=tc.monitor, factor=tc.lr_plateau_factor, patience=tc.lr_plateau_patience,
            min_lr=tc.lr * 1e-3))
    if work_dir is not None:
        (Path(work_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
        callbacks.append(keras.callbacks.ModelCheckpoint(
            Path(work_dir) / "checkpoints" / "best.weights.h5", monitor=tc.monitor,
            save_best_only=True, save_weights_only=True))
    return callbacks


def train(
    cfg: Config,
    *,
    dataset: Dataset | None = None,
    work_dir: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    model: Any = None,
    initial_epoch: int = 0,
    callback_state: dict[str, dict] | None = None,
    deadline: float | None = None,
) -> TrainResult:
    """Train the configured model; returns it holding the weights of its best epoch.

    `work_dir` receives the best-model checkpoint (checkpoints/best.weights.h5) and TensorBoard
    logs (logs/). A pretrained backbone trains in the two `phases`, one `fit` each. `model` and
    `initial_epoch` continue a compiled model from a checkpoint; `callback_state` (see
    `state_keeper`) carries early stopping's and the LR schedule's counters across such a pause:
    they are read from it first and written into it every epoch, before any of `callbacks`
    runs. `deadline` (a `time.time()`) fits a cosine decay to the epochs that still fit before
    it (see `cosine_schedule`).
    """
    import keras

    started = time.perf_counter()
    keras.utils.set_random_seed(run_seed(cfg.train.seed, initial_epoch))
    dataset = dataset if dataset is not None else data_mod.load(cfg.data)
    if model is None:
        model = build_model(cfg.model, dataset.input_shape, len(dataset.class_names))
    tc = cfg.train
    stateful = training_callbacks(tc, work_dir) + lr_schedule(cfg, deadline)
    # Early stopping's, the LR plateau's and the cosine's counters carry on from one phase to
    # the next, and across a pause when the caller keeps `callback_state`.
    state = callback_state if callback_state is not None else {}
    all_callbacks = [*stateful, state_keeper(stateful, state)]
    if work_dir is not None and tc.tensorboard:
        all_callbacks.append(keras.callbacks.TensorBoard(log_dir=str(Path(work_dir) / "logs")))
    all_callbacks += list(callbacks)
    history: dict[str, list[float]] = {}
    plan = phases(cfg)
    earlier = []  # (last epoch, weights as Keras left them) of each phase but the last
    for phase, (start, end) in enumerate(plan):
        if end <= initial_epoch:
            continue
        begin = max(start, initial_epoch)
        if set_phase(model, cfg, begin) or not getattr(model, "compiled", False):
            compile_model(model, tc, lr=phase_lr(cfg, begin))
        if phase and begin == start:
            state.get("EarlyStopping", {})["wait"] = 0  # fine-tuning gets its own patience
        fit = model.fit(**fit_inputs(dataset, tc, begin), epochs=end, initial_epoch=begin,
                        callbacks=all_callbacks, verbose=tc.verbose)
        for key, values in fit.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        if phase < len(plan) - 1:
            earlier.append((begin + len(fit.history.get("loss", [])), model.get_weights()))
    epochs_run = initial_epoch + len(history.get("loss", []))
    monitored = history.get(tc.monitor, [])
    if monitored and tc.restore_best_weights:
        pick = np.argmin if tc.monitor == "val_loss" else np.argmax
        best_epoch = initial_epoch + int(pick(monitored)) + 1
        # Each fit restored its own best epoch; an earlier phase may have held the best one.
        owner = next((weights for last, weights in earlier if best_epoch <= last), None)
        if owner is not None:
            model.set_weights(owner)
    else:
        best_epoch = epochs_run
    return TrainResult(model=model, history=history, dataset=dataset, config=cfg,
                       epochs_run=epochs_run, best_epoch=best_epoch,
                       stopped_early=epochs_run < tc.epochs,
                       wall_s=time.perf_counter() - started, initial_epoch=initial_epoch)


def run_seed(seed: int, initial_epoch: int) -> int:
    """The global seed of a run that starts at `initial_epoch`: train.seed for a fresh run; for
    a run that goes on from a checkpoint, one drawn from both, so that it does not replay the
    first run's random streams (data order, dropout masks) from the start."""
    if initial_epoch == 0:
        return seed
    return int(np.random.SeedSequence((seed, initial_epoch)).generate_state(1)[0])


def load_to_resume(path: str | Path, cfg: Config, epoch: int):
    """A checkpoint's model.keras (optimizer included), to train on from `epoch` with
    `train(..., initial_epoch=epoch)`. Keras saves no layer's random state: a loaded Dropout
    (or augmentation) layer draws a new seed from Python's global `random`, which a fresh
    process seeds from the OS. The global seeds are therefore set first. Without that, two runs
    of the same seeded search trained the same trial differently once it was resumed at a
    rung: its first epoch bit-identical, its third at 0.9008 and 0.8955 validation accuracy."""
    import keras

    keras.utils.set_random_seed(run_seed(cfg.train.seed, epoch))
    return keras.saving.load_model(path)


def fit_inputs(dataset: Dataset, tc: TrainConfig, first_epoch: int) -> dict[str, Any]:
    """model.fit's data: the arrays, or streams over the decoded cache's shards (their own
    shuffling, one shard held at a time)."""
    if dataset.train_shards is None:
        return {"x": dataset.x_train, "y": dataset.y_train, "batch_size": tc.batch_size,
                "validation_data": (dataset.x_val, dataset.y_val)}
    return {"x": cache.stream(dataset.train_shards, dataset.y_train, tc.batch_size,
                              shuffle=True, seed=tc.seed, first_epoch=first_epoch),
            "validation_data": cache.stream(dataset.val_shards, dataset.y_val, tc.batch_size,
                                            shuffle=False),
            "shuffle": False}


def pretrained(cfg: Config) -> bool:
    """A keras.applications backbone starting from trained weights: trained in two phases."""
    return cfg.model.arch in BACKBONES and cfg.model.weights != "none"


def phases(cfg: Config) -> list[tuple[int, int]]:
    """[begin, end) epochs of each training phase: with a pretrained backbone, the frozen
    warm-up (train.warmup_epochs) and then the fine-tuning; else one phase."""
    warmup = min(cfg.train.warmup_epochs, cfg.train.epochs)
    if not pretrained(cfg) or warmup == 0:
        return [(0, cfg.train.epochs)]
    return [(0, warmup)] + ([(warmup, cfg.train.epochs)] if warmup < cfg.train.epochs else [])


def phase_lr(cfg: Config, epoch: int) -> float:
    if pretrained(cfg) and epoch >= cfg.train.warmup_epochs:
        return cfg.train.fine_tune_lr or cfg.train.lr / 10
    return cfg.train.lr


COSINE_FLOOR = 0.01
"""Cosine decay ends at this fraction of the phase's learning rate."""


def lr_schedule(cfg: Config, deadline: float | None = None) -> list[Any]:
    """train.lr_decay's callback, if any."""
    return [cosine_schedule(cfg, deadline)] if cfg.train.lr_decay == "cosine" else []


def cosine_lr(cfg: Config, epoch: int, progress: float | None = None) -> float:
    """train.lr_decay cosine: the learning rate of 0-based `epoch`, `progress` (by default
    the epoch's share of its phase) along a half cosine from the phase's learning rate down to
    COSINE_FLOOR of it."""
    if progress is None:
        start, end = phase_of(cfg, epoch)
        progress = (epoch - start) / (end - start)
    return phase_lr(cfg, epoch) * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5
                                   * (1 + math.cos(math.pi * progress)))


def phase_of(cfg: Config, epoch: int) -> tuple[int, int]:
    return next((s, e) for s, e in phases(cfg) if s <= epoch < e)


DEADLINE_SHARE = 0.95
"""A fitted cosine plans its epochs into this share of the time left, for epochs that run
slower than the last one."""


def cosine_schedule(cfg: Config, deadline: float | None = None):
    """The cosine decay as a Keras callback. Each epoch moves its phase's progress an equal
    step towards the end of the phase: 1/epochs over a whole phase, the curve `cosine_lr`
    draws. With a `deadline`, the phase's end is the last epoch that fits before it, judged
    from the last epoch's wall time, once fewer fit than the phase has left: the decay ends
    when training has to stop instead of being cut off at a high learning rate (a search's
    time budget stopped the winner of a 30-minute search at a seventh of its peak rate).
    `progress` and the `phase` it belongs to carry over a pause through `state_keeper`; a
    checkpoint planned for another phase (another tune.max_epochs) goes on from the new curve.
    """
    import keras

    class CosineDecay(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.progress, self.phase = 0.0, None  # of the next epoch; RESUMABLE
            self.began = None
            self.rate = self.step = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            start, end = phase_of(cfg, epoch)
            if epoch == start or self.phase != [start, end]:
                self.progress, self.phase = (epoch - start) / (end - start), [start, end]
            now = time.time()
            epochs_left = end - epoch
            if deadline is not None and self.began is not None:
                fit = int(DEADLINE_SHARE * (deadline - now) / max(now - self.began, 1e-3))
                epochs_left = max(1, min(epochs_left, fit))
            self.began = now
            self.step = (1 - self.progress) / epochs_left
            self.rate = cosine_lr(cfg, epoch, self.progress)
            self.model.optimizer.learning_rate = self.rate

        def on_epoch_end(self, epoch, logs=None):
            self.progress += self.step
            if logs is not None:
                logs["learning_rate"] = self.rate

    return CosineDecay()


def set_phase(model, cfg: Config, epoch: int) -> bool:
    """Freeze a pretrained backbone during the warm-up; after it, let its top
    `model.fine_tune_layers` layers train, BatchNorm layers excepted (frozen, they run in
    inference mode). True when this changed what trains: the model must be compiled again."""
    import keras

    if not pretrained(cfg):
        return False
    backbone = model.get_layer(BACKBONE_LAYER)
    before = [layer.trainable for layer in backbone.layers]
    if epoch < cfg.train.warmup_epochs:
        backbone.trainable = False
    else:
        backbone.trainable = True
        cut = len(backbone.layers) - cfg.model.fine_tune_layers
        for i, layer in enumerate(backbone.layers):
            if i < cut or isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return before != [layer.trainable for layer in backbone.layers]


# What Keras's own callbacks count across epochs and reset in on_train_begin. The learning rate
# that ReduceLROnPlateau lowered lives in the optimizer, which model.keras saves.
RESUMABLE = {"EarlyStopping": ("wait", "best", "best_epoch", "stopped_epoch"),
             "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
             "ModelCheckpoint": ("best",), "CosineDecay": ("progress", "phase")}


def state_keeper(stateful: Sequence[Any], state: dict[str, dict]):
    """A Keras callback, placed after `stateful` (callbacks named in RESUMABLE), that puts back
    their counters from `state` once they have reset themselves at train begin, and copies them
    into `state` (JSON-ready) after every epoch. EarlyStopping's in-memory best weights are not
    kept: a resumed run restores the best weights only if it finds a better epoch itself."""
    import keras

    def plain(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return int(value) if isinstance(value, int | np.integer) else float(value)

    class StateKeeper(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            for callback in stateful:
                for key, value in state.get(type(callback).__name__, {}).items():
                    setattr(callback, key, value)

        def on_epoch_end(self, epoch, logs=None):
            for callback in stateful:
                name = type(callback).__name__
                state[name] = {key: plain(getattr(callback, key)) for key in RESUMABLE[name]}

    return StateKeeper()


def predict_probs(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


def metrics_from_probs(probs: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows = true class)."""
    n = len(class_names)
    pred = probs.argmax(axis=1)
    picked = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class = {
        name: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None)
        for i, name in enumerate(class_names)
    }
    return {
        "loss": float(-np.log(picked).mean()),
        "accuracy": float((pred == y).mean()),
        "examples": int(len(y)),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }


def evaluate(model, x: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    """Test metrics of `model` on (x, y): loss, accuracy, per-class accuracy, confusion matrix."""
    return metrics_from_probs(predict_probs(model, x), y, class_names)


def publish(
    result: TrainResult, out_dir: str | Path, extra_metadata: dict | None = None
) -> dict[str, Any]:
    """Evaluate on the held-out test split, draw the plots and write the bundle to `out_dir`.

    Returns the summary printed by `clfsys train`.
    """
    from clfsys import bundle, report

    out = Path(out_dir)
    ds = result.dataset
    probs = predict_probs(result.model, ds.x_test)
    test = metrics_from_probs(probs, ds.y_test, ds.class_names)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    report.learning_curves(result.history, plots / "learning_curves.png",
                           best_epoch=result.best_epoch, initial_epoch=result.initial_epoch)
    report.confusion_matrix(np.asarray(test["confusion_matrix"]), ds.class_names,
                            plots / "confusion_matrix.png")
    report.sample_grid(ds.x_test, ds.y_test, probs, ds.class_names, plots / "samples.png",
                       seed=result.config.train.seed)
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": result.best_val_accuracy,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_wall_s": round(result.wall_s, 1),
        "test": test,
        "data": {"train": len(ds.y_train), "val": len(ds.y_val), "test": len(ds.y_test),
                 "skipped_files": len(ds.skipped)},
    }
    meta = bundle.save(out, result.model, class_names=ds.class_names,
                       color_mode=ds.color_mode, resize=result.config.data.resize,
                       config=result.config.to_dict(), metrics=metrics,
                       history=result.history, extra=extra_metadata)
    print(f"bundle written to {out} (plots in {plots})", file=sys.stderr)
    return {
        "bundle": str(out), "model_id": meta["model_id"],
        "test_accuracy": round(test["accuracy"], 4), "test_loss": round(test["loss"], 4),
        "val_accuracy": round(result.best_val_accuracy, 4), "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
    }

