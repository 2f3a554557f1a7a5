"""What an earlier search learned, for a new one (`clfsys tune --warm-start PREVIOUS_OUT`).

Reads the earlier search's trials.parquet (a local path or a URI) and places each trial in the
new search space: a trial is inside when every dimension the space samples for its architecture
holds its value, and every other key it set equals what the new search would use (the space's
fixed value, else the base config's). Trials outside are named, with the first key that put
them there, and given to no searcher. No Ray or TensorFlow here.
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from clfsys import storage
from clfsys.config import Config
from clfsys.errors import ConfigError, DataError
from clfsys.space import ARCH_KEY, SEP, Param, decode

TRIALS_FILE = "trials.parquet"
FINISHED = ("max_epochs", "early_stopping")  # trained out; anything else stopped early


@dataclass(frozen=True)
class Earlier:
    """One earlier trial, inside the new space."""

    trial_id: str
    sample: dict[str, Any]  # sampled name -> value, in the new space's terms (its arch's only)
    value: float  # its best validation accuracy
    epochs: int
    completed: bool  # trained out (max_epochs, early stopping), not stopped at a rung
    checkpoint: str | None  # its newest checkpoint, a location


@dataclass(frozen=True)
class WarmStart:
    """An earlier search (`source`, its --out) placed in the new space."""

    source: str
    inside: list[Earlier]
    outside: dict[str, str]  # trial id -> why it is outside the new space

    def summary(self, continued: int) -> dict[str, Any]:
        return {"from": self.source, "earlier_trials": len(self.inside) + len(self.outside),
                "used": len(self.inside), "outside_space": len(self.outside),
                "continued": continued}


def _dotted(raw: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def _cell(value: Any) -> Any:
    """A trials.parquet cell back to the value the trial used (lists were written as JSON)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value.item() if hasattr(value, "item") else value


def _plain(value: Any) -> Any:
    """A config value as a trial's row holds it (tuples are lists there)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _in_domain(param: Param, value: Any) -> tuple[bool, Any]:
    """Whether `value` lies in `param`'s domain, and its sampled form there."""
    if param.kind in ("choice", "fixed"):
        for arg in param.args:
            if decode(arg) == value and isinstance(decode(arg), bool) == isinstance(value, bool):
                return True, arg
        return False, None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False, None
    low, high = param.args
    if param.kind == "randint":
        return (value == int(value) and low <= value <= high), int(value)
    return low <= value <= high, float(value)


def _describe(param: Param) -> str:
    if param.kind in ("choice", "fixed"):
        return f"{param.kind} {[decode(a) for a in param.args]}"
    return f"{param.kind} [{param.args[0]:g}, {param.args[1]:g}]"


def place(row: dict[str, Any], params: list[Param], base: Config) -> tuple[dict | None, str]:
    """An earlier trial's row -> its sample in the new space, or None and why it is outside.
    A key the earlier trial did not set took the base config's value, as it would now."""
    used = {k[len("param."):]: _cell(v) for k, v in row.items() if k.startswith("param.")}
    used = {k: v for k, v in used.items() if v is not None}
    arch = used.get(ARCH_KEY, base.model.arch)
    arch_param = next((p for p in params if p.name == ARCH_KEY), None)
    if arch_param is not None and not _in_domain(arch_param, arch)[0]:
        return None, f"{ARCH_KEY}={arch!r} is outside {_describe(arch_param)}"
    try:
        defaults = base.replace(**{ARCH_KEY: arch}).to_dict()
    except ConfigError as exc:
        return None, str(exc)
    sample: dict[str, Any] = {}
    covered = set()
    for param in params:
        prefix, sep, _ = param.name.partition(SEP)
        if sep and prefix != arch:
            continue  # another architecture's parameter
        covered.add(param.key)
        value = used.get(param.key, _plain(_dotted(defaults, param.key)))
        inside, sampled = _in_domain(param, value)
        if not inside:
            return None, f"{param.key}={value!r} is outside {_describe(param)}"
        if param.kind != "fixed":
            sample[param.name] = sampled
    for key, value in used.items():
        if key not in covered and _plain(_dotted(defaults, key)) != value:
            return None, f"{key}={value!r}, but the new search uses {_dotted(defaults, key)!r}"
    return sample, ""


def load(source: str, params: list[Param], base: Config) -> WarmStart:
    """The earlier search at `source` (its --out), placed in the new space; prints a summary."""
    import pandas as pd

    location = storage.join(storage.normalize(source), TRIALS_FILE)
    try:
        table = pd.read_parquet(io.BytesIO(storage.read_bytes(location)))
    except storage.StorageError as exc:
        raise DataError(f"tune.warm_start.path: cannot read {location}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"tune.warm_start.path: {location} is not a trials table: {exc}") \
            from None
    missing = {"trial_id", "best_val_accuracy", "epochs_run", "stopped_by"} - set(table.columns)
    if missing:
        raise DataError(f"tune.warm_start.path: {location} lacks column(s) {sorted(missing)}")
    inside, outside = [], {}
    for row in table.to_dict("records"):
        value = _cell(row["best_val_accuracy"])
        if value is None:  # errored, or never started: nothing learned
            outside[row["trial_id"]] = "it has no result"
            continue
        sample, why = place(row, params, base)
        if sample is None:
            outside[row["trial_id"]] = why
            continue
        inside.append(Earlier(
            trial_id=row["trial_id"], sample=sample, value=float(value),
            epochs=int(row["epochs_run"]), completed=row["stopped_by"] in FINISHED,
            checkpoint=_cell(row.get("checkpoint"))))
    warm = WarmStart(storage.normalize(source), inside, outside)
    print(f"warm start: {len(table)} earlier trials in {location}, {len(inside)} inside the new "
          f"space", file=sys.stderr)
    for trial_id, why in list(outside.items())[:5]:
        print(f"  outside: {trial_id}: {why}", file=sys.stderr)
    if len(outside) > 5:
        print(f"  ... and {len(outside) - 5} more outside", file=sys.stderr)
    return warm


def best(warm: WarmStart, k: int) -> list[Earlier]:
    """The k most accurate earlier trials inside the new space that have a checkpoint, best
    first; a trial further along ranks first among equals."""
    ranked = sorted((e for e in warm.inside if e.checkpoint),
                    key=lambda e: (-e.value, -e.epochs, e.trial_id))
    return ranked[:k]
