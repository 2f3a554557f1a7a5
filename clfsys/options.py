"""The one way to declare options: frozen dataclasses whose fields are made with
`option(default, help)`, for the job config (config.py, tune_config.py) and the commands' options
alike. `build` makes one from a mapping of typed values (a YAML file, a Serve config's `args`),
checking each value against its field's type with an error that names the key. A command's CLI
flags (`add_flags`), the object from parsed flags (`from_args`) and from the strings of `serve run
... key=value` (`from_values`) all come from the fields, so no default or type is written twice;
the job config's keys are set with `--set key=value` instead of a flag each."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import field, fields
from typing import Any

from clfsys.errors import ClfsysError, ConfigError


def check(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise ConfigError("<key> <rule>, got <value>") unless `ok`."""
    if not ok:
        shown = int(value) if isinstance(value, float) and value.is_integer() else value
        raise ConfigError(f"{key} {rule}, got {shown!r}")


def option(default: Any, help: str) -> Any:
    """A field with its default and its help (a list or a mapping is copied for each object)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _kind(cls, name: str) -> type:
    """The field's type without None (int for `int | None`)."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        (hint,) = [t for t in typing.get_args(hint) if t is not type(None)]
    return hint


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of `cls`, its type, default and help taken from the field."""
    for f in fields(cls):
        kind = _kind(cls, f.name)
        shown = ("on" if f.default else "off") if kind is bool else f.default
        help = f"{f.metadata['help']} (default: {shown})"
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction,
                                default=f.default, help=help)
        else:
            parser.add_argument(flag(f.name), type=kind, default=f.default,
                                metavar=f.name.upper(), help=help)


def from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def from_values(cls, values: dict[str, Any], what: str = "option"):
    """`cls` from a mapping of field names to values, typed as in a YAML file or strings as
    `serve run ... key=value` passes them; an unknown name or a bad value names the field."""
    hints = typing.get_type_hints(cls)
    typed = {name: _from_text(value, _kind(cls, name), f"{what} {name}")
             if name in hints and isinstance(value, str) else value
             for name, value in values.items()}
    return build(cls, typed, "", what)


def _from_text(value: str, kind: Any, where: str) -> Any:
    if kind not in (bool, int, float):
        return value
    text = value.strip().lower()
    if text in ("none", "null", ""):
        return None
    if kind is bool and text in _TRUE + _FALSE:
        return text in _TRUE
    try:
        return kind(value)
    except ValueError:
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise ClfsysError(f"{where}: {value!r} is not {article} {kind.__name__}") from None


def build(cls: type, raw: Any, prefix: str, what: str):
    """The dataclass `cls` from a mapping of its field names to typed values (nested dataclasses
    from nested mappings); an unknown name or a value of the wrong type raises ConfigError naming
    the dotted key (`prefix.name`), `what` saying what an unknown name is."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for name, value in raw.items():
        dotted = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise ConfigError(f"unknown {what} {dotted!r} (known: {', '.join(sorted(names))})")
        kwargs[name] = _coerce(value, hints[name], dotted, what)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, what: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, what)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", what) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key, what)
    raise AssertionError(f"unsupported type {hint!r} for {key}")
