"""Click options generated from the library's config dataclasses (one definition of each default).

A config field (:mod:`adapterhub.training.config`) carries its default and a
:class:`~adapterhub.params.ParamDef` (help, range, choices, metavar: the same definition type merge
and mask methods use); :func:`config_option` turns one field into a ``click.option`` and
:func:`config_options` adds every command-line field of a config class and hands the command one
built config object, as mergekit's ``add_merge_options`` does for ``MergeOptions``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import click

from adapterhub.params import ParamDef
from adapterhub.training.config import MASK_REGISTRY, field_param

from .common import LazyChoice


class DensityType(click.ParamType[float]):
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


# the dtypes a stored adapter's values may have (adapterhub.format.VALUE_DTYPES, named without importing torch)
VALUE_DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def values_dtype_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--values-dtype``: the dtype the written adapter stores its values in (recorded in its card)."""
    return click.option("--values-dtype", type=click.Choice(VALUE_DTYPE_CHOICES), default=None, help=help)


def _mask_choices() -> list[str]:
    from adapterhub.training.masks import (
        MASK_METHODS,  # torch: only when the option is parsed or its help shown
    )

    return list(MASK_METHODS)


PARAM_TYPES: dict[str, Callable[[], click.ParamType[Any]]] = {"density": DensityType}
LAZY_CHOICES: dict[str, Callable[[], Any]] = {MASK_REGISTRY: _mask_choices}


def _click_type(p: ParamDef) -> Any:
    """The click type of a setting: its domain type, registry or choices, a numeric range, or its kind."""
    if p.domain is not None:
        return PARAM_TYPES[p.domain]()
    if p.registry is not None:
        return LazyChoice(LAZY_CHOICES[p.registry])
    if p.choices:
        return click.Choice(list(p.choices))
    if p.low is not None or p.high is not None:
        if p.kind is int:
            return click.IntRange(min=None if p.low is None else int(p.low), max=None if p.high is None else int(p.high),
                                  min_open=p.low_open, max_open=p.high_open)
        return click.FloatRange(min=p.low, max=p.high, min_open=p.low_open, max_open=p.high_open)
    return p.kind if p.kind in (int, float) else None


def config_option(cls: type, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``click.option`` of field ``name`` of config dataclass ``cls`` (flag ``--name-with-dashes``).

    Default, help, type (range, choices, domain type) and metavar come from the field; the
    default is shown in help when it is not None.
    Raises: KeyError for an unknown field.
    """
    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    p = field_param(cls, f)
    kw: dict[str, Any] = {"default": p.default}
    typ = _click_type(p)
    if typ is not None:
        kw["type"] = typ
    if p.default is not None:
        kw["show_default"] = True
    if p.help:
        kw["help"] = p.help
    if p.metavar:
        kw["metavar"] = p.metavar
    return click.option("--" + name.replace("_", "-"), name, **kw)


def cli_fields(cls: type) -> list[str]:
    """Names of the fields of ``cls`` that appear on the command line, in field order."""
    return [f.name for f in dataclasses.fields(cls) if field_param(cls, f).cli]


def config_options(cls: type, *, into: str = "config") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add an option for every command-line field of ``cls``; the command gets ``into=cls(...)``.

    The options appear in help in field order, at the decorator's place among the command's
    other options. Fields kept off the command line keep their dataclass default.
    """
    names = cli_fields(cls)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[into] = cls(**{n: kwargs.pop(n) for n in names})
            return fn(*args, **kwargs)

        out: Callable[..., Any] = wrapper
        for n in reversed(names):  # click lists options in reverse order of application
            out = config_option(cls, n)(out)
        return out

    return deco


__all__ = ["DensityType", "config_option", "config_options", "cli_fields"]
