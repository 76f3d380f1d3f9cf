"""Command-line flags from a config dataclass: one `--flag-name` per field, so a script's arguments and its config
can never disagree.

    parser = dataclass_parser(RouterTrainConfig, "Train an AT-MoE router")
    cfg = RouterTrainConfig(**vars(parser.parse_args(argv)))

bool fields become `--flag / --no-flag`, tuple fields take one or more values, `int` and `float` fields are parsed
as such and every other field as text (`X | None` as X). A field without a default is a required flag. The
dataclass's own `__post_init__` then validates the values.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_SCALARS = {"int": int, "float": float}


def _type_name(annotation: Any) -> str:
    """'int' for int, 'int' for 'int | None', 'tuple' for 'tuple[str, ...]' (annotations may be strings)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    first = next(t.strip() for t in text.split("|") if t.strip() != "None")
    return first.split("[", 1)[0]


def dataclass_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the dataclass `cls` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        required, default = False, f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        elif f.default is dataclasses.MISSING:
            required, default = True, None
        kind = _type_name(f.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, required=required, default=default)
        elif kind == "tuple":
            parser.add_argument(flag, nargs="+", required=required, default=default)
        else:
            parser.add_argument(flag, type=_SCALARS.get(kind, str), required=required, default=default)
    return parser


__all__ = ["dataclass_parser"]
