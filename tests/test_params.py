"""Parameter definitions shared by the merge and mask registries (adapterhub/params.py)."""
from __future__ import annotations

import pytest

from adapterhub.errors import MergeError, TrainingError
from adapterhub.merging import METHODS
from adapterhub.params import ParamDef, configure
from adapterhub.training import masks as M

DEFS = (ParamDef("density", low=0.0, low_open=True, high=1.0, required=True),
        ParamDef("lam", default=1.0, label="lambda", flag="--lambda"),
        ParamDef("block_size", kind=int, default=16, low=1),
        ParamDef("mode", kind=str, default="a", choices=("a", "b")),
        ParamDef("weights", kind=list))


def test_both_registries_declare_their_parameters_with_one_type():
    assert all(isinstance(p, ParamDef) for m in METHODS.values() for p in m.params)
    assert all(isinstance(p, ParamDef) for m in M.MASK_METHODS.values() for p in m.params)


def test_configure_fills_defaults_after_the_given_options_and_keeps_values_as_given():
    out = configure(DEFS, {"density": 1, "mode": None}, owner="method 'x'", error=MergeError)
    assert out == {"density": 1, "lam": 1.0, "block_size": 16, "mode": "a"}
    assert list(out) == ["density", "lam", "block_size", "mode"] and type(out["density"]) is int


@pytest.mark.parametrize("opts,msg", [
    ({}, r"^method 'x' needs density$"),
    ({"density": 0.5, "gamma": 0.1}, r"^method 'x' does not take gamma \(it takes: density, lam, "
                                     r"block_size, mode, weights\)$"),
    ({"density": 0}, r"^density must be in \(0, 1\], got 0$"),
    ({"density": float("nan")}, r"^density must be finite, got nan$"),
    ({"density": 0.5, "lam": "1"}, r"^lambda must be a number, got '1'$"),
    ({"density": 0.5, "block_size": 0}, r"^block_size must be in \[1, inf\), got 0$"),
    ({"density": 0.5, "block_size": 2.0}, r"^block_size must be an integer, got 2.0$"),
    ({"density": 0.5, "mode": "c"}, r"^unknown mode 'c'; choose one of a, b$"),
    ({"density": 0.5, "mode": 1}, r"^mode must be a string, got 1$"),
    ({"density": 0.5, "weights": "12"}, r"^weights must be finite numbers$"),
    ({"density": 0.5, "weights": [1, True]}, r"^weights must be finite numbers$"),
])
def test_each_definition_checks_itself_in_one_line(opts, msg):
    with pytest.raises(MergeError, match=msg):
        configure(DEFS, opts, owner="method 'x'", error=MergeError)


def test_non_strict_configure_ignores_undeclared_options_but_checks_its_own():
    cs = M.get_mask_method("connection-sensitivity")
    assert cs.options({"drop_fraction": 0.3}) == {"score": "abs"}
    with pytest.raises(TrainingError, match=r"^unknown score mode 'raw'; choose one of abs, signed$"):
        cs.options({"score": "raw"})
    with pytest.raises(TrainingError, match=r"^drop_fraction must be in \[0, 1\), got 1.0$"):
        M.get_mask_method("grow-drop").options({"drop_fraction": 1.0, "score": "signed"})


def test_a_definition_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        ParamDef("x", kind=dict)
