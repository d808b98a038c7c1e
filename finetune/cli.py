"""Fire-style command lines built from a config dataclass, with one-line errors instead of tracebacks.

Every script describes its flags as a dataclass (sharing `CommonConfig`), so the same flag always has
the same name, default and help text. Each field carries its one-line description beside it, declared
with `flag(default, help)`; a subclass that only changes a default keeps its base's description.
`--help` prints them as one aligned `--name=DEFAULT  type  description` line per flag.

A config's `FLAG_ALIASES` maps the original scripts' flag names to ours, so their command lines keep
working: `{"learning_rate": "lr"}` reads `--learning_rate=X` as `--lr=X`, and a target with a value
template, `{"dataset_name": "dataset=datasets/{}"}`, reads `--dataset_name=X` as `--dataset=datasets/X`.
Each alias used prints one note naming our flag, so the user learns the name `--help` lists.
A flag named in `REPEATABLE_FLAGS` may be given several times: `--reward=a --reward=b` is `--reward=a,b`
(fire alone would keep the last one).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import fire

from moondream2.errors import UserInputError

def flag(default: Any, help: str) -> Any:
    """A config field with its `--help` line: `lr: float = flag(1e-5, "peak learning rate")`."""
    return dataclasses.field(default=default, metadata={"help": help})


def run_cli(config_cls: type, main: Callable, description: str, argv: list[str] | None = None):
    """Parse `--name=value` flags into `config_cls` and call `main(config)`.

    `--help` or `-h` anywhere prints the flags and exits before anything is built or written, so
    adding it to a half-typed command line is always safe.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(format_help(config_cls, description))
        raise SystemExit(0)
    argv = join_repeated(config_cls, translate_aliases(config_cls, argv))
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for previous, arg in zip([""] + argv, argv):
        if not arg.startswith("-") and not (previous.startswith("--") and "=" not in previous):
            _fail(f"unexpected argument {arg!r}: pass options as --name=value; run with --help to list them")
        if arg.startswith("--") and arg != "--":
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            if name.startswith("no") and name[2:] in fields:
                continue
            if name not in fields:
                _fail(f"unknown flag --{name}; run with --help to list the flags")

    def entry(**kwargs):
        try:
            main(config_cls(**kwargs))  # fire would print a return value; results go to the log
        except UserInputError as err:
            _fail(str(err))

    entry.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=_default(f)) for name, f in fields.items()]
    )
    try:
        fire.Fire(entry, command=argv)
    except UserInputError as err:
        _fail(str(err))


def translate_aliases(config_cls: type, argv: list[str]) -> list[str]:
    """The original scripts' flags rewritten to ours (`--name=value` and `--name value` forms), with
    a one-line note on stderr per alias used."""
    aliases = getattr(config_cls, "FLAG_ALIASES", {})
    out = []
    for arg in argv:
        name, sep, value = arg[2:].partition("=")
        target = aliases.get(name.replace("-", "_")) if arg.startswith("--") else None
        if target is None:
            out.append(arg)
            continue
        ours, _, template = target.partition("=")
        if template:
            if not sep:
                _fail(f"--{name} needs a value: --{name}=VALUE")
            print(f"note: --{name}={value} is --{ours}={template.format(value)} here", file=sys.stderr)
            out.append(f"--{ours}={template.format(value)}")
        else:
            print(f"note: --{name} is --{ours} here", file=sys.stderr)
            out.append(f"--{ours}{sep}{value}")
    return out


def join_repeated(config_cls: type, argv: list[str]) -> list[str]:
    """Each flag of `REPEATABLE_FLAGS` given more than once (`--name=value` or `--name value`) as one
    `--name=v1,v2,...` where it first appears; everything else unchanged."""
    repeatable = getattr(config_cls, "REPEATABLE_FLAGS", ())
    out: list[str] = []
    values: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, sep, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        spaced = not sep and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if not (arg.startswith("--") and name in repeatable and (sep or spaced)):
            out.append(arg)
        else:
            if spaced:
                i += 1
                value = argv[i]
            if name not in first:
                first[name] = len(out)
                out.append("")  # the joined flag, below
            values.setdefault(name, []).append(value)
        i += 1
    for name, at in first.items():
        out[at] = f"--{name}={','.join(values[name])}"
    return out


def flag_help(config_cls: type) -> dict[str, str]:
    """Each flag's one-line description: its field's own, else that of the nearest base class that
    gives one ('' if none)."""
    return {f.name: _field_help(config_cls, f.name) for f in dataclasses.fields(config_cls)}


def _field_help(config_cls: type, name: str) -> str:
    for cls in config_cls.__mro__:
        declared = vars(cls).get("__dataclass_fields__", {}).get(name)
        if declared is not None and "help" in declared.metadata:
            return declared.metadata["help"]
    return ""


def format_help(config_cls: type, description: str) -> str:
    """One aligned line per flag, `--name=DEFAULT  type  description`, readable top to bottom."""
    fields = dataclasses.fields(config_cls)
    flags = [f"--{f.name}={_show(_default(f))}" for f in fields]
    types = [_type_name(f.type) for f in fields]
    width, type_width = max(map(len, flags)), max(map(len, types))
    rows = [f"  {flag:<{width}}  {kind:<{type_width}}  {text}"
            for flag, kind, text in zip(flags, types, flag_help(config_cls).values())]
    usage = f"usage: python {Path(sys.argv[0]).name} [--flag=VALUE ...]"
    syntax = "values: --use_lora=False, --classes='[a,b]', --rename='{bb: black bishop}'"
    aliases = [f"  original --{old} is --{new.replace('{}', old.upper())}"
               for old, new in getattr(config_cls, "FLAG_ALIASES", {}).items()]
    renamed = ["", "the original scripts' flags, accepted under their old names:", *aliases] if aliases else []
    return "\n".join([description, "", usage, syntax, "", "flags (with their defaults):", *rows, *renamed])


def _show(value) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _type_name(annotation) -> str:
    """`int | None` -> `int`: None is a default, not a type to type; tuples are typed as lists."""
    name = annotation if isinstance(annotation, str) else annotation.__name__
    name = name.replace(" | None", "").replace("Optional[", "").rstrip("]").split("[")[0]
    return {"tuple": "list"}.get(name, name)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
