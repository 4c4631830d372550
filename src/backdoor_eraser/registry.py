"""Name → (factory, config dataclass) registries for attacks, defenses, models and datasets."""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Callable, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Looks things up by name; unknown names raise a ``UserError`` listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[Callable[..., T], type | None, str]] = {}

    def register(self, name: str, config: type | None = None, *, help: str = ""):
        """Decorator: ``@REG.register("badnets", BadNetsConfig)`` on a class or function
        whose call signature is ``factory(config)`` when ``config`` is given, else ``factory(**kwargs)``."""

        def deco(factory):
            key = name.lower()
            if key in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[key] = (factory, config, help or first_sentence(factory.__doc__))
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries

    def _entry(self, name: str):
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def get(self, name: str) -> Callable[..., T]:
        """The registered factory itself."""
        return self._entry(name)[0]

    def config_class(self, name: str) -> type | None:
        return self._entry(name)[1]

    def summary(self, name: str) -> str:
        return self._entry(name)[2]

    def make_config(self, name: str, **kwargs) -> Any:
        """Build the typed config of ``name`` from keyword values, rejecting unknown keys."""
        cfg_cls = self.config_class(name)
        if cfg_cls is None:
            raise UserError(f"{self.kind} {name!r} takes no config")
        return build_config(cfg_cls, kwargs, what=f"{self.kind} {name!r}")

    def create(self, name: str, config: Any = None, **kwargs) -> T:
        factory, cfg_cls, _ = self._entry(name)
        if cfg_cls is None:
            if config is not None:
                raise UserError(f"{self.kind} {name!r} takes no config object")
            return factory(**kwargs)
        if config is None:
            config = self.make_config(name, **kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        return factory(config)


def first_sentence(doc: str | None) -> str:
    """The docstring's first sentence (its first paragraph up to the first full stop)."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    start = 0
    while (end := para.find(". ", start)) >= 0:
        if not para[:end + 1].endswith(("e.g.", "i.e.", "et al.", "cf.")):
            return para[:end + 1]
        start = end + 2
    return para


def config_fields(cfg_cls: type) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of each field of a config dataclass, with string annotations resolved."""
    hints = typing.get_type_hints(cfg_cls)
    out = []
    for f in dataclasses.fields(cfg_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        out.append((f.name, hints.get(f.name, Any), default))
    return out


def build_config(cfg_cls: type, values: dict[str, Any], what: str = "config"):
    """Instantiate ``cfg_cls`` from ``values`` (keys may use '-' for '_'), coercing lists to tuples."""
    known = {name: (typ, default) for name, typ, default in config_fields(cfg_cls)}
    clean = {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in known:
            raise UserError(f"{what} has no parameter {key!r}; parameters: {', '.join(known)}")
        typ, default = known[k]
        if isinstance(value, list) and (isinstance(default, tuple) or typing.get_origin(_non_none(typ)) is tuple):
            value = tuple(value)
        if _non_none(typ) is float and isinstance(value, str):
            value = _yaml_float(value)  # PyYAML reads 5e-4 (no dot) as a string
        problem = type_problem(typ, default, value)
        if problem:
            raise UserError(f"{what}: parameter {k!r} must be {problem}, got {value!r}")
        clean[k] = value
    try:
        return cfg_cls(**clean)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad {what} parameters: {exc}") from None


def _non_none(typ):
    """The non-None member of an Optional annotation (the annotation itself otherwise)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0] if len(args) == 1 else typ
    return typ


def _yaml_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text


_SIMPLE = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _simple_problem(typ, value) -> str | None:
    if typ is bool:
        return None if isinstance(value, bool) else _SIMPLE[bool]
    if typ is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else _SIMPLE[int]
    if typ is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else _SIMPLE[float]
    if typ is str:
        return None if isinstance(value, (str, os.PathLike)) else _SIMPLE[str]
    return None


def type_problem(typ, default, value) -> str | None:
    """What ``value`` should have been for a field annotated ``typ`` (None when it fits). Only plain
    types and tuples of them are checked; a YAML ``epochs: "ten"`` is caught before any training."""
    base = _non_none(typ)
    if value is None:
        optional = base is not typ or default is None
        return None if optional else f"a value ({getattr(base, '__name__', base)})"
    if typing.get_origin(base) is tuple:
        if not isinstance(value, tuple):
            return "a list"
        args = [a for a in typing.get_args(base) if a is not Ellipsis]
        elem = args[0] if len(args) == 1 or (args and all(a is args[0] for a in args)) else None
        for v in value:
            if elem in _SIMPLE and _simple_problem(elem, v):
                return f"a list of {_SIMPLE[elem].replace('an ', '').replace('a ', '')}s"
        return None
    return _simple_problem(base, value) if base in _SIMPLE else None


def config_to_dict(cfg) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def identity_dict(cfg) -> dict[str, Any]:
    """:func:`config_to_dict` as an identity (the grid's cell hash): without the fields that sit at their
    ``neutral`` value, the value that does what the code did before the field existed (dataclass field
    metadata ``{"neutral": v}``), nor the fields whose metadata ``{"with": name}`` ties them to such a
    field. Adding an optional stage then leaves every stored cell that does not use it valid."""
    return drop_idle(type(cfg), config_to_dict(cfg))


def drop_idle(cls, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a config dict of dataclass ``cls``, possibly written before some fields existed)
    without the idle fields :func:`identity_dict` leaves out; a field it lacks counts as neutral."""
    fields = dataclasses.fields(cls)
    idle = {f.name for f in fields if "neutral" in f.metadata
            and values.get(f.name, json_ready(f.metadata["neutral"])) == json_ready(f.metadata["neutral"])}
    idle |= {f.name for f in fields if f.metadata.get("with") in idle}
    return {k: v for k, v in values.items() if k not in idle}


def json_ready(obj):
    """Plain JSON values: tensors and numpy scalars become numbers, tuples lists, and NaN/±inf ``None``
    (strict JSON has no tokens for them; a NaN metric means "not defined here", e.g. no such images)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return json_ready(obj.item())
    return obj
