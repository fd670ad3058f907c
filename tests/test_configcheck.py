"""Declarative range checks (imgclust.configcheck, issue 17 item 8).

The config classes are found by parsing src/imgclust for dataclasses whose fields are declared
with ``option(...)`` / ``rule(...)``, and the out-of-range values are derived from each field's
declared rule: a new config class or a new field is covered without editing this file.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import annotated_types as at
import numpy as np
import pytest

import imgclust
from imgclust.configcheck import OneOf, Rule, describe, field_rules, option, rule_of
from imgclust.errors import InputError

SRC = Path(imgclust.__file__).parent


def _declaring_classes() -> list[tuple[str, str]]:
    """(module, class) of every class in src/imgclust with a field declared by option()/rule()."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mod = ".".join(("imgclust",) + path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            calls = [n.func.id for stmt in node.body if isinstance(stmt, ast.AnnAssign) and stmt.value is not None
                     for n in ast.walk(stmt.value) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
            if {"option", "rule"} & set(calls):
                out.append((mod, node.name))
    return out


def _config_classes() -> list[type]:
    """The declaring classes, their subclasses (e.g. ICCEHeadsConfig), and every registered method's Config."""
    from imgclust.methods import available_methods

    found: dict[str, type] = {}
    for mod, name in _declaring_classes():
        found[f"{mod}.{name}"] = getattr(importlib.import_module(mod), name)
    for m in available_methods().values():
        found[f"{m.Config.__module__}.{m.Config.__qualname__}"] = m.Config
    todo = list(found.values())
    while todo:
        for sub in todo.pop().__subclasses__():
            key = f"{sub.__module__}.{sub.__qualname__}"
            if key not in found and dataclasses.is_dataclass(sub):
                found[key] = sub
                todo.append(sub)
    return [found[k] for k in sorted(found)]


CLASSES = _config_classes()


def _below(bound, integer: bool):
    return bound - 1 if integer else bound - max(abs(bound), 1) * 0.5


def _above(bound, integer: bool):
    return bound + 1 if integer else bound + max(abs(bound), 1) * 0.5


def _bad_values(kinds: frozenset[str] | None, r: Rule) -> list:
    """Values the field's annotation and rule must refuse (each violates exactly one thing)."""
    kinds = kinds or frozenset()
    integer = "int" in kinds and "float" not in kinds
    out: list = []
    for c in r.constraints:
        if isinstance(c, OneOf):
            out.append("no-such-choice")
        elif isinstance(c, at.Gt):
            out += [c.gt, _below(c.gt, integer)]
        elif isinstance(c, at.Ge):
            out.append(_below(c.ge, integer))
        elif isinstance(c, at.Lt):
            out += [c.lt, _above(c.lt, integer)]
        elif isinstance(c, at.Le):
            out.append(_above(c.le, integer))
        elif isinstance(c, at.MinLen) and c.min_length > 0:
            out.append([])
    for c in r.each:
        if isinstance(c, OneOf):
            out.append(["no-such-choice"])
        elif isinstance(c, (at.Gt, at.Ge)):
            out.append([_below(c.gt if isinstance(c, at.Gt) else c.ge, False)])
        elif isinstance(c, (at.Lt, at.Le)):
            out.append([_above(c.lt if isinstance(c, at.Lt) else c.le, False)])
    if kinds & {"int", "float"}:
        out += ["three", True, float("nan")]
        if integer:
            out.append(2.5)
    if "bool" in kinds:
        out += ["yes", 1]
    return out


def _edges(kinds: frozenset[str] | None, r: Rule) -> list:
    """Values on the closed bounds of the rule, which it must accept."""
    integer = "int" in (kinds or ()) and "float" not in (kinds or ())
    out = [c.ge for c in r.constraints if isinstance(c, at.Ge)] + [c.le for c in r.constraints if isinstance(c, at.Le)]
    out += [[c.ge] for c in r.each if isinstance(c, at.Ge)] + [[c.le] for c in r.each if isinstance(c, at.Le)]
    out += [c.choices[-1] for c in r.constraints if isinstance(c, OneOf)]
    return [int(v) if integer and not isinstance(v, list) else v for v in out]


def _cases(values_of) -> list:
    cases = []
    for cls in CLASSES:
        for name, kinds, r in field_rules(cls):
            for v in values_of(kinds, r):
                cases.append(pytest.param(cls, name, v, id=f"{cls.__name__}.{name}={v!r}"))
    return cases


def test_every_config_class_is_found_and_accepts_its_defaults():
    names = {c.__name__ for c in CLASSES}
    # the configs item 8 replaced the hand-written checks of (a floor: new ones join automatically)
    assert {"KMeansConfig", "TEMIConfig", "ICCEHeadsConfig", "ICCEConfig", "PICIConfig", "CCConfig",
            "SPICESelfConfig", "SPICEConfig", "ICBPLConfig", "ManifoldConfig", "AutoConfig", "ICSRConfig",
            "ICSRMethodConfig", "FixMatchConfig", "PretrainConfig", "AugmentSpec", "Preprocess"} <= names
    for cls in CLASSES:
        cls()  # defaults are in range


def test_every_numeric_field_declares_its_range():
    """A new int / float option must say what it accepts (then the tests below cover it)."""
    missing = [f"{cls.__name__}.{name}" for cls in CLASSES for name, kinds, r in field_rules(cls)
               if kinds and kinds & {"int", "float"} and not r.constraints]
    assert not missing, f"numeric config fields without a declared range: {missing}"


@pytest.mark.parametrize(("cls", "name", "value"), _cases(_bad_values))
def test_out_of_range_value_is_one_line_naming_field_range_and_value(cls, name, value):
    with pytest.raises(InputError) as e:
        cls(**{name: value})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name} must be "), msg
    assert msg.endswith(f"; got {value!r}"), msg


@pytest.mark.parametrize(("cls", "name", "value"), _cases(_edges))
def test_values_on_closed_bounds_and_listed_choices_pass_the_field_rule(cls, name, value):
    try:
        cls(**{name: value})
    except InputError as e:  # only a rule relating two fields may refuse it, never this field's own
        assert not str(e).startswith(f"{name} must be "), str(e)


def test_messages_state_the_allowed_values():
    def msg(cls, **kw):
        with pytest.raises(InputError) as e:
            cls(**kw)
        return str(e.value)

    from imgclust.methods.icbpl import ICBPLConfig
    from imgclust.methods.icce import ICCEConfig
    from imgclust.methods.pici import PICIConfig
    from imgclust.methods.temi import ICCEHeadsConfig, TEMIConfig
    from imgclust.refine.icsr import ICSRConfig

    assert msg(TEMIConfig, heads=0) == "heads must be a positive integer; got 0"
    assert msg(TEMIConfig, heads=True) == "heads must be a positive integer; got True"
    assert msg(TEMIConfig, momentum=1.5) == "momentum must be in [0, 1]; got 1.5"
    assert msg(TEMIConfig, lr=-1) == "lr must be > 0; got -1"
    assert msg(TEMIConfig, checkpoint="yes") == "checkpoint must be true or false; got 'yes'"
    assert msg(TEMIConfig, norm="bn") == "norm must be one of none, l2, standardize, batchnorm; got 'bn'"
    # ICCEHeadsConfig redeclares norm (a new default) without a rule: TEMIConfig's still applies
    assert msg(ICCEHeadsConfig, norm="bn").startswith("norm must be one of none, l2")
    assert msg(ICCEConfig, st_lrs=[0.1, 0]) == "st_lrs must be a non-empty list of numbers > 0; got [0.1, 0]"
    assert msg(ICCEConfig, consensus=[]).startswith("consensus must be a non-empty list of cspa, hgpa, mcla, hbgf")
    assert msg(PICIConfig, mask_ratio=1.0) == "mask_ratio must be in (0, 1) (PISD needs masked patches); got 1.0"
    assert msg(ICBPLConfig, image_size=4) == "image_size must be an integer >= 8 or none; got 4"
    assert ICBPLConfig(image_size=None).image_size is None
    # rules relating two fields stay explicit, after the declared ranges
    assert "k_start <= k_stop" in msg(ICSRConfig, k_start=0.9, k_stop=0.5)
    assert "max_neighbors (10) must be >= k (50)" in msg(TEMIConfig, max_neighbors=10)


def test_numbers_from_numpy_are_accepted_and_ints_are_fine_floats():
    from imgclust.methods.temi import TEMIConfig

    cfg = TEMIConfig(heads=np.int64(3), lr=np.float32(0.5), momentum=1, checkpoint=np.bool_(False))
    assert cfg.heads == 3 and cfg.momentum == 1


def test_borrowed_rules_match_their_source():
    from imgclust.data.augment import AugmentSpec
    from imgclust.methods.spice import SPICEConfig, SPICESelfConfig
    from imgclust.refine.fixmatch import FixMatchConfig

    assert rule_of(SPICEConfig, "semi_lr") == rule_of(FixMatchConfig, "lr")
    assert rule_of(SPICESelfConfig, "shift") == rule_of(AugmentSpec, "shift")
    with pytest.raises(InputError, match=r"^semi_threshold must be in \[0, 1\]; got 2$"):
        SPICEConfig(semi_threshold=2)


def test_declarations_are_checked_when_written():
    @dataclasses.dataclass
    class Demo:
        n: int = option(3, at.Interval(ge=1, le=5))
        xs: list[float] = option([1.0], at.MinLen(2))

    Demo()  # option() itself checks nothing; a config calls check_fields in __post_init__
    assert Demo().xs is not Demo().xs  # list defaults are copied per instance
    assert describe(frozenset({"int"}), rule_of(Demo, "n")) == "an integer in [1, 5]"
    assert describe(frozenset({"list"}), rule_of(Demo, "xs")) == "a list of at least 2"
    assert describe(frozenset({"list"}), Rule((at.MinLen(1), at.MaxLen(3)))) == "a non-empty list and at most 3"
    assert describe(frozenset({"float", "None"}), Rule((at.Le(1),))) == "<= 1 or none"
    with pytest.raises(TypeError, match="unsupported constraint"):
        option(1, at.MultipleOf(2))


def _cli(*args, cwd):
    env = dict(os.environ, IMGCLUST_QUIET="1", IMGCLUST_CACHE=str(cwd / "cache"),
               PYTHONPATH=os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "imgclust.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize(("args", "line"), [
    (["cluster", "digits", "--k", "3", "--method", "temi", "--option", "lr=-1"], "error: lr must be > 0; got -1"),
    (["cluster", "digits", "--k", "3", "--method", "auto", "--option", 'candidates=["kmeans", "temi?momentum=2"]'],
     "error: momentum must be in [0, 1]; got 2"),
    (["pretrain", "digits", "--option", "temperature=-0.5"], "error: temperature must be >= 0 or none; got -0.5"),
])
def test_cli_option_out_of_range_is_one_line_without_traceback(tmp_path, args, line):
    r = _cli(*args, "--out", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [line]
    assert not (tmp_path / "out").exists()
