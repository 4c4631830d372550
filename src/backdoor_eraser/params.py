"""Turning command-line ``--name value`` pairs and YAML files into typed config values."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .registry import config_fields


def _base_type(typ):
    """The non-None member of an Optional annotation."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return typ


def coerce(value: str, typ, default, name: str):
    """Parse one command-line string as the field's type."""
    base = _base_type(typ)
    origin = typing.get_origin(base)
    if value.lower() in ("none", "null") and (default is None or base is not typ):
        return None
    try:
        if base is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            return int(value)
        if base is float:
            return float(value)
        if origin is tuple or isinstance(default, tuple):
            args = typing.get_args(base)
            elem = args[0] if args else (type(default[0]) if default else str)
            # ';' separates items that themselves hold commas, e.g. patch positions "x,y".
            parts = [p for p in value.split(";" if ";" in value else ",") if p.strip() != ""]
            return tuple(elem(p.strip()) if elem in (int, float) else p.strip() for p in parts)
        return value
    except ValueError:
        raise UserError(f"--{name.replace('_', '-')}: cannot read {value!r} as {getattr(base, '__name__', base)}") from None


def parse_param_flags(cfg_cls: type, argv: list[str], what: str) -> dict[str, Any]:
    """``['--beta', '500,1000,1000', '--distance=paper', '--wrap']`` → typed values for ``cfg_cls``.

    A boolean flag without a value means true.
    """
    fields = {name: (typ, default) for name, typ, default in config_fields(cfg_cls)}
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise UserError(f"unexpected argument {tok!r}")
        key, eq, val = tok[2:].partition("=")
        name = key.replace("-", "_")
        if name not in fields:
            listing = ", ".join("--" + f.replace("_", "-") for f in fields)
            raise UserError(f"{what} has no parameter --{key}; its parameters: {listing}")
        typ, default = fields[name]
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if _base_type(typ) is bool and (nxt is None or nxt.startswith("--")):
                out[name] = True
                i += 1
                continue
            if nxt is None:
                raise UserError(f"--{key} needs a value")
            val = nxt
            i += 1
        out[name] = coerce(val, typ, default, name)
        i += 1
    return out


def read_yaml_params(path: str | Path | None) -> dict[str, Any]:
    """A flat mapping of parameter names to values from a YAML file (empty when ``path`` is None)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse {p} as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p} must hold a mapping of parameter names to values")
    return {str(k).replace("-", "_"): tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def describe_params(cfg_cls: type) -> list[str]:
    """``--name (type) = default`` lines for listings."""
    lines = []
    for name, typ, default in config_fields(cfg_cls):
        base = _base_type(typ)
        tname = getattr(base, "__name__", str(base)).replace("typing.", "")
        shown = "required" if default is dataclasses.MISSING else repr(default)
        lines.append(f"--{name.replace('_', '-'):<18} {tname:<8} default {shown}")
    return lines
