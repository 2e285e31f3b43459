"""Click options generated from the library's config dataclasses (one definition of each default).

A config field (:mod:`adapterhub.train_config`) carries its default and an ``OptionSpec``
(help, range, choices); :func:`config_option` turns one field into a ``click.option`` and
:func:`config_options` adds every command-line field of a config class and hands the command one
built config object, as mergekit's ``add_merge_options`` does for ``MergeOptions``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from typing import Any

import click

from adapterhub.train_config import MASK_REGISTRY, option_spec

from .common import LazyChoice


class DensityType(click.ParamType):
    """A density in (0, 1]."""

    name = "density"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not (math.isfinite(v) and 0 < v <= 1):
            self.fail(f"density must be in (0, 1], got {value}", param, ctx)
        return v


def _mask_choices() -> list[str]:
    from adapterhub.masks import (
        MASK_METHODS,  # torch: only when the option is parsed or its help shown
    )

    return list(MASK_METHODS)


PARAM_TYPES: dict[str, Callable[[], click.ParamType]] = {"density": DensityType}
LAZY_CHOICES: dict[str, Callable[[], Any]] = {MASK_REGISTRY: _mask_choices}


def _base_type(cls: type, name: str) -> type:
    """``int``/``float``/``str`` of a field annotated ``T`` or ``T | None``."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _click_type(cls: type, f: dataclasses.Field) -> Any:
    spec = option_spec(f)
    if spec.param is not None:
        return PARAM_TYPES[spec.param]()
    if isinstance(spec.choices, str):
        return LazyChoice(LAZY_CHOICES[spec.choices])
    if spec.choices is not None:
        return click.Choice(list(spec.choices))
    base = _base_type(cls, f.name)
    if spec.min is not None or spec.max is not None:
        rng = click.IntRange if base is int else click.FloatRange
        return rng(min=spec.min, max=spec.max, min_open=spec.min_open, max_open=spec.max_open)
    return base if base in (int, float) else None


def config_option(cls: type, name: str) -> Callable[[Callable], Callable]:
    """The ``click.option`` of field ``name`` of config dataclass ``cls`` (flag ``--name-with-dashes``).

    Default, help, type (range, choices, domain type) and metavar come from the field; the
    default is shown in help when it is not None.
    Raises: KeyError for an unknown field.
    """
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    spec = option_spec(f)
    kw: dict[str, Any] = {"default": f.default}
    typ = _click_type(cls, f)
    if typ is not None:
        kw["type"] = typ
    if f.default is not None:
        kw["show_default"] = True
    if spec.help:
        kw["help"] = spec.help
    if spec.metavar:
        kw["metavar"] = spec.metavar
    return click.option("--" + name.replace("_", "-"), name, **kw)


def cli_fields(cls: type) -> list[str]:
    """Names of the fields of ``cls`` that appear on the command line, in field order."""
    return [f.name for f in dataclasses.fields(cls) if option_spec(f).cli]


def config_options(cls: type, *, into: str = "config") -> Callable[[Callable], Callable]:
    """Add an option for every command-line field of ``cls``; the command gets ``into=cls(...)``.

    The options appear in help in field order, at the decorator's place among the command's
    other options. Fields kept off the command line keep their dataclass default.
    """
    names = cli_fields(cls)

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[into] = cls(**{n: kwargs.pop(n) for n in names})
            return fn(*args, **kwargs)

        for n in reversed(names):  # click lists options in reverse order of application
            wrapper = config_option(cls, n)(wrapper)
        return wrapper

    return deco


__all__ = ["DensityType", "config_option", "config_options", "cli_fields"]
