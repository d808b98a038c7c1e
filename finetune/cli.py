"""Fire-style command lines built from a config dataclass, with one-line errors instead of tracebacks.

Every script describes its flags as a dataclass (sharing `CommonConfig`), so the same flag always has
the same name, default and help text; field docs come from the `FLAG_HELP` table.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Callable

import fire

from moondream2.errors import UserInputError

FLAG_HELP = {
    "model": "model preset: md2, md3, tiny, tiny-md3 (tiny presets are random-init, for CPU tests)",
    "weights": "base weights (.safetensors); default: moondream2/model.safetensors (md2), models/model_md3.safetensors (md3), random init (tiny)",
    "tokenizer": "tokenizer.json path or hub id; default: moondream/starmie-v1 for real models, builtin for tiny",
    "dataset": "COCO dataset directory (Roboflow layout or one instances JSON) or a JSON file",
    "device": "cuda, mps or cpu; default: the first available in that order",
    "output_dir": "where checkpoints, logs and pictures go",
    "max_steps": "stop after this many optimizer steps (default: run all epochs)",
    "eval_interval": "evaluate on the validation split every this many optimizer steps",
    "seed": "random seed for init, shuffling, dropout and sampling",
    "wandb": "also log to Weights & Biases (needs `pip install wandb` and a login)",
    "resume": "resume from a resume_*.pt file written by an earlier run",
}


def run_cli(config_cls: type, main: Callable, description: str, argv: list[str] | None = None):
    """Parse `--name=value` flags into `config_cls` and call `main(config)`."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for previous, arg in zip([""] + argv, argv):
        if not arg.startswith("-") and not (previous.startswith("--") and "=" not in previous):
            _fail(f"unexpected argument {arg!r}: pass options as --name=value; run with --help to list them")
        if arg.startswith("--") and arg not in ("--help", "--"):
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
    helps = getattr(config_cls, "FLAG_HELP", {})
    lines = [f"  {name}: {helps.get(name) or FLAG_HELP.get(name, '')}" for name in fields]
    entry.__doc__ = f"{description}\n\nArgs:\n" + "\n".join(lines)
    try:
        fire.Fire(entry, command=argv)
    except UserInputError as err:
        _fail(str(err))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
