"""The engine's arguments as CLI flags, shared by every subcommand that builds an engine.

The flags are derived from the fields of engine/config.py: one `--kebab-case` flag per field, with the field's
default, its type (a bool becomes --x / --no-x) and the help, choices and metavar in its metadata."""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import Field, fields

from afdserve.engine.config import EngineConfig, engine_arg_sections, engine_config, engine_sections

# The --help groups, by EngineConfig section.
ARG_GROUPS = {"engine": ("model", "cache", "scheduler"), "attention-FFN disaggregation": ("parallel",)}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    sections = engine_sections()
    for title, names in ARG_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            hints = typing.get_type_hints(sections[name])
            for f in fields(sections[name]):
                group.add_argument("--" + f.name.replace("_", "-"), **_flag_options(f, hints[f.name]))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return engine_config(**{name: getattr(args, name) for name in engine_arg_sections()})


def _flag_options(f: Field, hint: typing.Any) -> dict[str, typing.Any]:
    """argparse keywords for one config field: `x: int | None = None` parses as an int that may be left out."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [t for t in typing.get_args(hint) if t is not types.NoneType]
    if hint is bool:
        kind = dict(action=argparse.BooleanOptionalAction)
    else:
        kind = dict(type=hint)
    return dict(default=f.default, **kind, **f.metadata)
