"""Parameters declared as data: one definition type for method options and config settings.

Merge methods (:mod:`adapterhub.merging.methods`) and mask methods (:mod:`adapterhub.training.masks`) each
declare the parameters they take as a tuple of :class:`ParamDef` (after mergekit's
``ConfigParameterDef`` in ``merge_methods/base.py``); :func:`configure` fills defaults, refuses
unknown or missing ones and lets each definition check its own value, so no method re-checks a
range by hand and every error is one line naming the parameter.

The settings of :class:`~adapterhub.training.config.TrainConfig` and
:class:`~adapterhub.training.config.FedConfig` carry the same type in their field metadata; the CLI
builds its options from it (``adapterhub/cli/options.py``: help, range, choices, metavar), so a
setting shared with a mask method (``score``, ``score_batches``, ``drop_fraction``) is one object.

This module imports neither torch nor click: the CLI may read definitions without paying torch's
start-up time (tests/test_startup.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any, Mapping, Sequence

from .errors import AdapterHubError

__all__ = ["ParamDef", "configure"]

# The value kinds a definition can check; ``list`` is a list of finite numbers (merge weights).
KINDS = (float, int, str, list)


@dataclass(frozen=True)
class ParamDef:
    """One parameter of a method.

    Attributes:
        name: keyword in the library (``lam``, ``density``, ``score_batches``).
        kind: ``float`` (a finite real number), ``int``, ``str`` or ``list`` (of finite numbers).
        default: filled in when the caller gives nothing (``None``: left out).
        required: the caller must give a value.
        low, high: inclusive bounds for numbers; ``low_open``/``high_open`` make them exclusive.
        choices: allowed values of a ``str`` parameter.
        registry: instead of ``choices``, the name of a registry whose ids are the allowed values
            (``"mask-methods"``); resolved by whoever owns the registry (the value is not checked here).
        domain: a named domain type the CLI uses instead of a range (``"density"``: a number in (0, 1]).
        label: how messages name the value (``lambda``, ``score mode``); default ``name``.
        flag: how messages name the option (``--lambda``); default ``--`` + ``name`` with dashes.
        help: one line for docs and command-line help.
        metavar: the placeholder the command-line help shows (``REGEX``).
        cli: False keeps a config setting off the command line (it keeps its default there).

    A definition may be made without a name (``name=""``) as a template for a config field; the
    field's name is filled in with :func:`dataclasses.replace`, and ``label``/``flag`` follow it.
    """

    name: str
    kind: type = float
    default: Any = None
    required: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    registry: str | None = None
    domain: str | None = None
    label: str = ""
    flag: str = ""
    help: str = ""
    metavar: str | None = None
    cli: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name!r}: kind must be one of float, int, str, list")
        if self.name and not self.label:
            object.__setattr__(self, "label", self.name)
        if self.name and not self.flag:
            object.__setattr__(self, "flag", _flag(self.name))

    def with_default(self, default: Any = None, *, required: bool = False) -> ParamDef:
        """The same definition with another default (or required instead)."""
        return replace(self, default=default, required=required)

    def validate(self, value: Any, error: type[AdapterHubError]) -> Any:
        """Check ``value``'s type, finiteness, range and choices.

        Returns: ``value`` unchanged (it is recorded as given, e.g. in a merge's card).
        Raises: ``error`` with one line naming the parameter.
        """
        if self.kind is list:
            if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
                    or not all(_is_real(v) and math.isfinite(float(v)) for v in value)):
                raise error(f"{self.label} must be finite numbers", keywords=(self.name,))
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise error(f"{self.label} must be a string, got {value!r}", keywords=(self.name,))
            if self.choices and value not in self.choices:
                raise error(f"unknown {self.label} {value!r}; choose one of {', '.join(self.choices)}",
                            keywords=(self.name,))
            return value
        if self.kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            raise error(f"{self.label} must be an integer, got {value!r}", keywords=(self.name,))
        if not _is_real(value):
            raise error(f"{self.label} must be a number, got {value!r}", keywords=(self.name,))
        v = float(value)
        if not math.isfinite(v):
            raise error(f"{self.label} must be finite, got {value}", keywords=(self.name,))
        if not self._in_range(v):
            raise error(f"{self.label} must be in {self._range_text()}, got {value}", keywords=(self.name,))
        return value

    def _in_range(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def _range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


def _is_real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def configure(defs: Sequence[ParamDef], options: Mapping[str, Any], *, owner: str,
              error: type[AdapterHubError], strict: bool = True) -> dict[str, Any]:
    """Fill defaults, check required and unknown options, and validate each value.

    Takes: the method's definitions; ``options`` (``None`` values count as not given);
    ``owner`` names the method in messages (``"method 'ties'"``); ``error`` is the exception
    raised; ``strict=False`` ignores options the method does not declare (for callers that hand
    one options dict to every method).
    Returns: the given options (in their order, values as given), then the missing defaults (in
    declaration order).
    Raises: ``error`` naming the option: one not taken (``strict``), a missing required one, or
    a bad value.
    """
    by_name = {p.name: p for p in defs}
    out: dict[str, Any] = {}
    for k, v in options.items():
        if v is None:
            continue
        if k not in by_name:
            if strict:
                raise error(f"{owner} does not take {k} (it takes: "
                            f"{', '.join(p.name for p in defs) or 'no parameters'})", keywords=(k,))
            continue
        out[k] = v
    for p in defs:
        if p.name not in out:
            if p.required:
                raise error(f"{owner} needs {p.name}", keywords=(p.name,))
            if p.default is not None:
                out[p.name] = p.default
    for k, v in out.items():
        by_name[k].validate(v, error)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
