"""Flag checks shared by every config dataclass, so a bad value stops the run before anything heavy.

Fire turns `--lr=abc` into the string "abc" and a bare `--lr` into True, and a dataclass does not
check its annotations: without these checks such values reach the optimizer (a bare `--lr` trained
at rate 1.0). `check_field_types` holds every field to its annotation in one place; `require` gives
range checks the same one-line message: flag, value, what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from moondream2.errors import UserInputError


def check_field_types(config: Any) -> None:
    """Hold every field of a config dataclass to its annotation, normalising where it is lossless
    (an int where a float goes, a list or a single name where a tuple goes, a number as a string;
    `tuple[float, ...]` takes numbers, one or a list)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        setattr(config, f.name, _coerce(f.name, getattr(config, f.name), hints[f.name]))


def require(config: Any, name: str, ok: bool, allowed: str) -> None:
    """Raise the one-line error `--name=value: allowed` unless `ok`."""
    if not ok:
        raise UserInputError(f"--{name}={getattr(config, name)}: {allowed}")


def check_output_dir(name: str, path: str, file: bool = False) -> None:
    """Fail before training, not at the first checkpoint, when `path` cannot become a writable directory
    (with `file`: when `path` cannot be written as a file, in a directory it can be created in)."""
    target = Path(path)
    if file:
        if target.is_dir():
            raise UserInputError(f"--{name}={path} is a directory; pass a file name")
        target = target.absolute().parent
    existing = next(p for p in (target, *target.absolute().parents) if p.exists())
    wanted = "a file in a directory" if file else "a directory"
    if not existing.is_dir():
        raise UserInputError(f"--{name}={path}: {existing} is a file, not a directory; pass {wanted}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"--{name}={path}: {existing} is not writable; pass {wanted} you can write to")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    kinds = [a for a in _alternatives(annotation) if a is not type(None)]
    if value is None and len(kinds) < len(_alternatives(annotation)):
        return None
    kind = (typing.get_origin(kinds[0]) or kinds[0]) if len(kinds) == 1 else None
    if kind is None:
        return value
    if value is True and kind is not bool:
        raise UserInputError(f"--{name} needs a value, e.g. --{name}=VALUE")
    if kind is bool and not isinstance(value, bool):
        raise UserInputError(f"--{name}={value}: use True or False")
    if kind is int and not _is_int(value):
        raise UserInputError(f"--{name}={value}: must be a whole number")
    if kind is float:
        if not (_is_number(value) and math.isfinite(value)):
            raise UserInputError(f"--{name}={value}: must be a finite number")
        return float(value)
    if kind is str:
        if not (isinstance(value, str) or _is_int(value)):
            raise UserInputError(f"--{name}={value}: must be text")
        return str(value)
    if kind is tuple and typing.get_args(kinds[0])[:1] == (float,):
        items = (value,) if _is_number(value) else value
        if not isinstance(items, (list, tuple)) or not all(_is_number(v) and math.isfinite(v) for v in items):
            raise UserInputError(f"--{name}={value}: must be a list of numbers, e.g. --{name}='[1.0,0.5]'")
        return tuple(float(v) for v in items)
    if kind is tuple:
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) or _is_int(v) for v in items):
            raise UserInputError(f"--{name}={value}: must be a list of names, e.g. --{name}='[a,b]'")
        return tuple(str(v) for v in items)
    if kind is dict and not isinstance(value, dict):
        raise UserInputError(f"--{name}={value}: must be a mapping, e.g. --{name}='{{a: b}}'")
    return value


def _alternatives(annotation: Any) -> tuple:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
