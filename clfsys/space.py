"""The search space of `tune.space`: parsed, checked and decoded without Ray.

YAML form::

    train.lr: {loguniform: [1.0e-4, 3.0e-3]}
    train.batch_size: {choice: [64, 128]}
    model.augment: false                      # a plain value is fixed
    model.arch:                               # each architecture with its own parameters
      mlp: {model.units: {choice: [[512, 256], [256]]}}
      cnn_bn: {model.filters: {choice: [[32, 64], [64, 128]]}, model.dropout: {uniform: [0.1, 0.4]}}

Conditional parameters are flat sampled keys named `<arch>:<dotted key>`; a trial uses only those
of its sampled architecture. Choices that are not plain scalars (lists) are sampled as JSON
strings so every searcher (Optuna included) can handle them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from clfsys.config import Config
from clfsys.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
ARCH_KEY = "model.arch"
_JSON = "json:"
CONTINUE_KEY = "continue_from"
"""A sample's key, set by the searcher only: the checkpoint (a location) of an earlier search's
trial that this trial goes on from (tune.warm_start.continue_top); not a config key."""
SEP = ":"
"""Between an architecture and its own parameter's key (not "/": Tune flattens on "/", and
Optuna's searcher then fails on such keys)."""


@dataclass(frozen=True)
class Param:
    """One sampled dimension: `name` is the sampled key, `key` the dotted config key."""

    name: str
    key: str
    kind: str
    args: tuple


def encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return _JSON + json.dumps(value)


def decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_JSON):
        return json.loads(value[len(_JSON):])
    return value


def _param(name: str, key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        return Param(name, key, "fixed", (encode(spec),))
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where} must be a value or one of "
                          f"{{{'|'.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.choice must be a non-empty list, got {args!r}")
        return Param(name, key, kind, tuple(encode(a) for a in args))
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
            or not args[0] < args[1]):
        raise ConfigError(f"{where}.{kind} must be [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{where}.loguniform needs low > 0, got {args[0]!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}.randint needs integer bounds, got {args!r}")
    return Param(name, key, kind, (float(args[0]), float(args[1])) if kind != "randint"
                 else (int(args[0]), int(args[1])))


def parse_space(space: dict[str, Any]) -> list[Param]:
    """Check `tune.space` and flatten it into sampled dimensions."""
    params: list[Param] = []
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if key == ARCH_KEY and isinstance(spec, dict) and not (
                len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            if not spec:
                raise ConfigError(f"{where} must name at least one architecture")
            params.append(Param(ARCH_KEY, ARCH_KEY, "choice", tuple(spec)))
            for arch, conditional in spec.items():
                if conditional is None:
                    continue
                if not isinstance(conditional, dict):
                    raise ConfigError(f"{where}.{arch} must map config keys to distributions, "
                                      f"got {conditional!r}")
                for sub_key, sub_spec in conditional.items():
                    if sub_key == ARCH_KEY:
                        raise ConfigError(f"{where}.{arch} cannot set {ARCH_KEY}")
                    params.append(_param(f"{arch}{SEP}{sub_key}", sub_key, sub_spec,
                                         f"{where}.{arch}.{sub_key}"))
        else:
            params.append(_param(key, key, spec, where))
    return params


def overrides(sample: dict[str, Any]) -> dict[str, Any]:
    """A sampled point -> the dotted-key overrides of one trial (conditionals of its arch only)."""
    arch = decode(sample.get(ARCH_KEY))
    result = {}
    for name, value in sample.items():
        prefix, sep, key = name.partition(SEP)
        if name == CONTINUE_KEY:
            continue
        if not sep:
            result[name] = decode(value)
        elif prefix == arch:
            result[key] = decode(value)
    return result


def trial_config(base: Config, sample: dict[str, Any]) -> Config:
    """The config of one trial, complete and checked: `base` with the sample's overrides (a
    sample of another architecture takes that architecture's defaults, see Config.replace)."""
    return base.replace(**overrides(sample))


def _corner(params: list[Param], arch: Any, end: int) -> dict[str, Any]:
    sample = {ARCH_KEY: arch} if arch is not None else {}
    for p in params:
        if p.name != ARCH_KEY:
            sample[p.name] = p.args[0] if (p.kind == "fixed" or end == 0) else p.args[-1]
    return sample


def check_space(base: Config, params: list[Param]) -> None:
    """Build the configs at the space's corners for every architecture, so that a wrong key or
    value fails before any trial starts, with a message naming tune.space."""
    arch_param = next((p for p in params if p.name == ARCH_KEY), None)
    for arch in arch_param.args if arch_param else (None,):
        for end in (0, -1):
            try:
                trial_config(base, _corner(params, arch, end))
            except ConfigError as exc:
                where = f" for {ARCH_KEY}={arch}" if arch is not None else ""
                raise ConfigError(f"tune.space{where}: {exc}") from None
