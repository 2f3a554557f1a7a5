"""A finished search -> trials.csv / trials.parquet, the best model's bundle and report/.

Reads Tune's ResultGrid (any storage Tune can read); knows nothing of how trials ran.
"""

from __future__ import annotations

import html
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from clfsys import report, storage
from clfsys.config import Config
from clfsys.dataset import Dataset
from clfsys.errors import DataError, IncompleteError
from clfsys.scheduler import STATE_FILE, asha_stops
from clfsys.space import CONTINUE_KEY, overrides, trial_config

INFRASTRUCTURE = "infrastructure"
TRAINING = "training"


def failure_kind(error: BaseException) -> str:
    """Why a trial failed: `infrastructure` (a lost node, worker or actor, unreachable storage)
    or `training` (the trial's own code: a NaN loss, a bad configuration)."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.NodeDiedError, rex.WorkerCrashedError, rex.ObjectLostError,
            rex.OutOfMemoryError, rex.RaySystemError)
    cause = getattr(error, "cause", None)
    for candidate in (error, cause):
        if isinstance(candidate, lost) or isinstance(candidate, OSError | TimeoutError) or (
                isinstance(candidate, storage.StorageError)):
            return INFRASTRUCTURE
    return TRAINING


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | dict) else value


def trial_rows(grid, cfg: Config, scheduler_state: str,
               experiment: str) -> tuple[list[dict], dict[str, Any]]:
    """One row per trial, and each trial's Result by id. `experiment` is the location of the
    search's Tune experiment (its trials' folders)."""
    from clfsys.raykit import failures_of, trials_of

    asha = asha_stops(scheduler_state)
    # A trial that never started (a time budget ran out first) has no result, so its sampled
    # configuration comes from Tune's trial record; so do the failures a trial recovered from.
    trials = trials_of(grid)
    rows, by_id = [], {}
    for result in grid:
        trial = trials.get(str(result.path))
        result_config = result.config or (trial.config if trial else {})
        failures, last = failures_of(trial) if trial else (0, None)
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        frame = result.metrics_dataframe
        has_curve = frame is not None and len(frame) and "val_accuracy" in frame
        epochs = int(metrics.get("epoch", 0))
        if result.error is not None:
            stopped_by = "error"
        elif trial_id in asha:
            stopped_by = "asha"
        elif metrics.get("keras_stopped"):
            stopped_by = "early_stopping"
        elif epochs >= cfg.tune.max_epochs:
            stopped_by = "max_epochs"
        else:
            stopped_by = "time_budget"
        error = None
        if result.error is not None:
            lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
            error = lines[-1][:300] if lines else type(result.error).__name__
        continued = result_config.get(CONTINUE_KEY)
        checkpoint = result.checkpoint
        rows.append({
            "trial_id": trial_id,
            **{f"param.{k}": _cell(v) for k, v in overrides(result_config).items()},
            # A trial that continued an earlier one may have had its best epoch there.
            "best_val_accuracy": float(metrics.get("best_val_accuracy") or
                                       frame["val_accuracy"].max()) if has_curve else None,
            "epochs_run": epochs,
            "asha_stopped": trial_id in asha,
            "stopped_by": stopped_by,
            "status": "ERROR" if result.error is not None else (
                "TERMINATED" if epochs else "NOT_STARTED"),
            "error": error,
            "failure": None if result.error is None else failure_kind(result.error),
            "failures": failures,  # retries included: a lost node's trial goes on elsewhere
            "last_failure": failure_kind(result.error or last) if (
                result.error or last) else None,
            **{column: metrics.get(column) for column in COST_COLUMNS},
            "wall_s": round(float(metrics.get("time_total_s", 0.0)), 1),
            "node_id": metrics.get("node_id"),
            "cuda_visible_devices": metrics.get("cuda_visible_devices"),
            "path": str(result.path),
            "checkpoint": storage.join(experiment, *Path(checkpoint.path).parts[-2:])
            if checkpoint is not None else None,
            "continued_from": storage.name(continued.rsplit("/", 1)[0]).removeprefix("trial_")
            if continued else None,
        })
        by_id[trial_id] = result
    rows.sort(key=lambda r: (r["best_val_accuracy"] is None, -(r["best_val_accuracy"] or 0)))
    return rows, by_id


COST_COLUMNS = ("ms_per_image_b1", "ms_per_image_b32", "params", "model_mb")
"""What each trial measured its model to cost in serving (clfsys.predict.serving_cost)."""


def select(finished: list[dict], limits: dict[str, float]) -> tuple[dict | None, dict]:
    """The most accurate of `finished` (best first) within `limits` (column -> largest value
    allowed; an unmeasured value fails), and, per column, how many more accurate trials it ruled
    out."""
    ruled_out: dict[str, int] = {}
    for row in finished:
        broken = [c for c, most in limits.items() if row.get(c) is None or row[c] > most]
        if not broken:
            return row, ruled_out
        for column in broken:
            ruled_out[column] = ruled_out.get(column, 0) + 1
    return None, ruled_out


def _best_bundle(result, row: dict, cfg: Config, dataset: Dataset, out: Path) -> dict[str, Any]:
    import keras

    from clfsys.train import TrainResult, publish

    if result.checkpoint is None:
        raise DataError(f"trial {row['trial_id']} has no checkpoint under {row['path']}")
    with result.checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / "state.json").read_text())
        model = keras.saving.load_model(Path(folder) / "best.keras")
    trial_cfg = trial_config(cfg, result.config).replace(**{
        "train.epochs": cfg.tune.max_epochs})
    trained = TrainResult(
        model=model, history=state["history"], dataset=dataset, config=trial_cfg,
        epochs_run=state["epoch"], best_epoch=state["best_epoch"],
        stopped_early=state["epoch"] < cfg.tune.max_epochs, wall_s=row["wall_s"])
    search_info = {"trial_id": row["trial_id"], "stopped_by": row["stopped_by"],
                   "params": {k[6:]: v for k, v in row.items() if k.startswith("param.")}}
    return publish(trained, out / "best", extra_metadata={"search": search_info})


def _curves(by_id: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    curves = {}
    for trial_id, result in by_id.items():
        frame = result.metrics_dataframe
        if frame is not None and len(frame) and "val_accuracy" in frame:
            frame = frame.drop_duplicates("epoch", keep="last").sort_values("epoch")
            curves[trial_id] = (frame["epoch"].to_numpy(), frame["val_accuracy"].to_numpy())
    return curves


def _leaderboard_html(rows: list[dict]) -> str:
    columns = ["trial_id"] + sorted({k for r in rows for k in r if k.startswith("param.")}) + [
        "best_val_accuracy", "epochs_run", "stopped_by", "ms_per_image_b1", "params",
        "wall_s", "error"]
    head = "".join(f"<th>{html.escape(c.removeprefix('param.'))}</th>" for c in columns)
    body = []
    for rank, row in enumerate(rows, start=1):
        cells = []
        for c in columns:
            value = row.get(c)
            if isinstance(value, float):
                value = f"{value:.4g}" if c != "best_val_accuracy" else f"{value:.4f}"
            cells.append(f"<td>{html.escape('' if value is None else str(value))}</td>")
        body.append(f"<tr><td>{rank}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>#</th>{head}</tr>{''.join(body)}</table>"


def _outside_html(outside: dict[str, str]) -> str:
    cells = "".join(f"<tr><td>{html.escape(t)}</td><td>{html.escape(why)}</td></tr>"
                    for t, why in outside.items())
    return f"<table><tr><th>earlier trial</th><th>why it was not used</th></tr>{cells}</table>"


def write_outputs(grid, cfg: Config, dataset: Dataset, location: str, out: Path, *,
                  experiment: str, wall_s: float, warm=None) -> dict:
    """Write trials.csv/.parquet, best/ and report/ to `location` (staged in the local folder
    `out`, then copied there when it is a URI); print a summary; return the result line.
    `warm` is the warm_start.WarmStart the search started from, if any."""
    import pandas as pd

    rows, by_id = trial_rows(grid, cfg, storage.join(location, STATE_FILE), experiment)
    table = pd.DataFrame(rows)
    limits = cfg.tune.select.limits()
    table["meets_select"] = [select([r], limits)[0] is not None for r in rows]
    table.to_csv(out / "trials.csv", index=False)
    table.to_parquet(out / "trials.parquet", index=False)
    errored = int((table["status"] == "ERROR").sum())
    not_started = int((table["status"] == "NOT_STARTED").sum())
    lost = int((table["failure"] == INFRASTRUCTURE).sum())
    recovered = int(((table["failures"] > 0) & (table["status"] != "ERROR")).sum())
    finished = [r for r in rows if r["status"] != "ERROR" and r["best_val_accuracy"] is not None]
    if not finished:
        storage.publish(out, location)
        raise IncompleteError(
            f"no trial finished successfully ({errored} errored: {lost} for infrastructure "
            f"reasons, {errored - lost} in training); see {storage.join(location, 'trials.csv')}",
            {"trials": len(rows), "errored": errored, "infrastructure_failures": lost,
             "trials_csv": storage.join(location, "trials.csv")})
    best_row, ruled_out = select(finished, limits)
    wanted = ", ".join(f"{c} <= {v:g}" for c, v in limits.items())
    if best_row is None:
        storage.publish(out, location)
        raise IncompleteError(
            f"no finished trial meets tune.select ({wanted}); see the cost columns of "
            f"{storage.join(location, 'trials.csv')}",
            {"trials": len(rows), "finished": len(finished), "select": limits,
             "trials_csv": storage.join(location, "trials.csv")})
    constraint_note = ""
    if ruled_out:
        constraint_note = "tune.select ruled out {} more accurate trial(s): {}".format(
            finished.index(best_row), ", ".join(
                f"{c} > {limits[c]:g} ({n})" for c, n in ruled_out.items()))
        print(constraint_note, file=sys.stderr)
    summary = _best_bundle(by_id[best_row["trial_id"]], best_row, cfg, dataset, out)

    pages = out / "report"
    pages.mkdir(exist_ok=True)
    report.trial_curves(_curves(by_id), {r["trial_id"]: r["stopped_by"] for r in rows},
                        best_row["trial_id"], pages / "trial_curves.png")
    report.leaderboard(finished, pages / "leaderboard.png")
    latency = f"ms_per_image_b{cfg.tune.select.latency_batch}"
    report.accuracy_vs_latency(finished, latency, pages / "accuracy_vs_latency.png",
                               best_row["trial_id"], limits.get(latency))
    for plot in ("learning_curves", "confusion_matrix", "samples"):
        shutil.copy(out / "best" / "plots" / f"{plot}.png", pages / f"best_{plot}.png")
    epochs_total = int(table["epochs_run"].sum())
    warm_info = warm.summary(int(table["continued_from"].notna().sum())) if warm else None
    warm_note = "" if warm_info is None else (
        "Warm start from {from}: {earlier_trials} earlier trials, {used} inside this space and "
        "told to the searcher ({outside_space} outside), {continued} continued from their "
        "checkpoints.".format(**warm_info))
    report.html_page(pages / "index.html", "clfsys search report", [
        ("Summary", f"<p>{len(rows)} trials ({errored} errored), {epochs_total} epochs in "
                    f"{wall_s:.0f} s. Best trial <b>{html.escape(best_row['trial_id'])}</b>: "
                    f"validation accuracy {best_row['best_val_accuracy']:.4f}, test accuracy "
                    f"<b>{summary['test_accuracy']:.4f}</b> (test split used once, for the "
                    f"best model only). {html.escape(constraint_note)} "
                    f"{html.escape(warm_note)}</p>"
                    "<p><a href='../trials.csv'>trials.csv</a> &middot; "
                    "<a href='../best/metadata.json'>best/metadata.json</a> &middot; "
                    f"TensorBoard: <code>tensorboard --logdir "
                    f"{html.escape(experiment_dir(by_id))}</code></p>"),
        ("Trials: validation accuracy per epoch", "<img src='trial_curves.png'>"),
        ("Leaderboard", "<img src='leaderboard.png'>" + _leaderboard_html(rows)),
        ("Accuracy against serving latency (Pareto front)",
         "<img src='accuracy_vs_latency.png'>"),
        ("Best model: learning curves", "<img src='best_learning_curves.png'>"),
        ("Best model: confusion matrix (test)", "<img src='best_confusion_matrix.png'>"),
        ("Best model: sample test predictions", "<img src='best_samples.png'>"),
        *([("Warm start: earlier trials outside this space", _outside_html(warm.outside))]
          if warm and warm.outside else []),
    ])
    print(f"\n== search done: {len(rows)} trials, {errored} errored ({lost} for infrastructure "
          f"reasons), {recovered} recovered from a failure, {not_started} not started, "
          f"{epochs_total} epochs, {wall_s:.0f} s", file=sys.stderr)
    if warm_note:
        print(warm_note, file=sys.stderr)
    for rank, row in enumerate(rows[:5], start=1):
        params = ", ".join(f"{k[6:]}={v}" for k, v in row.items()
                           if k.startswith("param.") and v is not None and v == v)
        score = "-" if row["best_val_accuracy"] is None else f"{row['best_val_accuracy']:.4f}"
        print(f"  {rank}. {row['trial_id']} val_acc={score} epochs={row['epochs_run']} "
              f"({row['stopped_by']}) {params}", file=sys.stderr)
    storage.publish(out, location)
    print(f"best model: {storage.join(location, 'best')}; report: "
          f"{storage.join(location, 'report', 'index.html')}", file=sys.stderr)
    return {
        "best_trial": best_row["trial_id"], "val_accuracy": round(best_row["best_val_accuracy"], 4),
        "test_accuracy": summary["test_accuracy"], "model_id": summary["model_id"],
        "bundle": storage.join(location, "best"), "trials": len(rows), "errored": errored,
        "infrastructure_failures": lost, "recovered": recovered, "not_started": not_started,
        "epochs_total": epochs_total, "wall_s": round(wall_s, 1),
        **({"select": limits, "ruled_out": ruled_out} if limits else {}),
        **({"warm_start": warm_info} if warm_info else {}),
        **{column: best_row[column] for column in COST_COLUMNS},
    }


def experiment_dir(by_id: dict[str, Any]) -> str:
    paths = [str(r.path) for r in by_id.values()]
    return str(Path(paths[0]).parent) if paths else ""
