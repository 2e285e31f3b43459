"""Click parameter types for the domain values commands take: REFs, names, weights, finite numbers.

Each type checks its value with the library's own parser (:func:`adapterhub.catalog.refs.parse_ref`,
:func:`adapterhub.catalog.names.validate_name`) and reports a bad one with ``self.fail``: a usage
error (exit 2) raised while click parses the command line, before the command body runs and so
before anything imports torch. The parsers are imported inside ``convert``; both modules are
torch-free, and keeping them out of module scope keeps ``adapterhub --help`` light.

Commands declare these parameters ``is_eager=True``: click converts eager parameters first, so a bad
REF or name is refused before a lazily filled choice (``--method``, ``--mask``, ``--head``, whose
registries import torch) is converted.
"""
from __future__ import annotations

import math
from typing import Any

import click


class RefType(click.ParamType[str]):
    """A REF: ``name``, ``name@N``, ``name@tag`` or ``sha256:<8+ hex>`` (checked by the library's parser)."""

    name = "REF"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """Return ``value`` unchanged when it parses as a REF.

        Raises: click.BadParameter (exit 2) with the parser's message otherwise.
        """
        from adapterhub.catalog.refs import parse_ref
        from adapterhub.errors import RefError

        try:
            parse_ref(value)
        except RefError as e:
            self.fail(str(e), param, ctx)
        return str(value)


class NameType(click.ParamType[str]):
    """A safe name (adapter, tag, base, deployment): letters, digits, ``_.-``; no path separators or ``..``."""

    name = "NAME"

    def __init__(self, what: str = "name") -> None:
        """``what`` names the value in messages (``"adapter name"``, ``"deployment name"``)."""
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """Return ``value`` when it is a valid name.

        Raises: click.BadParameter (exit 2) with the validator's message otherwise.
        """
        from adapterhub.catalog.names import validate_name
        from adapterhub.errors import NameError_

        try:
            return validate_name(value, self.what)
        except NameError_ as e:
            self.fail(str(e), param, ctx)


class WeightsType(click.ParamType[list[float]]):
    """Comma-separated finite floats: ``0.5,1,2``."""

    name = "W1,W2,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        """Return the numbers as a list.

        Raises: click.BadParameter (exit 2) for a non-number or a non-finite value.
        """
        if isinstance(value, list):
            return value
        try:
            out = [float(x) for x in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)
        if not out or not all(math.isfinite(x) for x in out):
            self.fail(f"{value!r}: weights must be finite numbers", param, ctx)
        return out


class FiniteFloat(click.ParamType[float]):
    """A finite number (``inf``/``nan`` refused): a value written into served weights."""

    name = "NUMBER"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """Return ``value`` as a float.

        Raises: click.BadParameter (exit 2) for a non-number, ``inf`` or ``nan``.
        """
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r}: must be a finite number", param, ctx)
        return x


REF = RefType()
ADAPTER_NAME = NameType("adapter name")
BASE_NAME = NameType("base name")
TAG = NameType("tag")
DEPLOYMENT_NAME = NameType("deployment name")

__all__ = ["ADAPTER_NAME", "BASE_NAME", "DEPLOYMENT_NAME", "REF", "TAG", "FiniteFloat", "NameType", "RefType",
           "WeightsType"]
