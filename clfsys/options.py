"""The one way to declare a command's options: a frozen dataclass whose fields are made with
`option(default, help)`. Its CLI flags (`add_flags`), the object from parsed flags (`from_args`)
and from the string or typed values of a Serve config's `args` (`from_values`) all come from the
fields, so no default or type is written twice."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import field, fields
from typing import Any

from clfsys.errors import ClfsysError


def option(default: Any, help: str) -> Any:
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
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ClfsysError(f"unknown {what} {unknown[0]!r} (known: {', '.join(known)})")
    typed = {}
    for name, value in values.items():
        kind = _kind(cls, name)
        if isinstance(value, str) and kind is not str:
            text = value.strip().lower()
            if text in ("none", "null", ""):
                value = None
            elif kind is bool and text in _TRUE + _FALSE:
                value = text in _TRUE
            else:
                try:
                    value = kind(value)
                except ValueError:
                    article = "an" if kind.__name__[0] in "aeiou" else "a"
                    raise ClfsysError(f"{what} {name}: {value!r} is not {article} "
                                      f"{kind.__name__}") from None
        typed[name] = value
    return cls(**typed)
