"""Declarative range checks for config dataclasses, read by one validator (issue 17, item 8).

A config field declares what it accepts next to its default, with the constraint objects of
`annotated-types <https://github.com/annotated-types/annotated-types>`_ (``Gt``, ``Ge``,
``Lt``, ``Le``, ``Interval``, ``MinLen``, ``MaxLen``, ``Len``) plus :class:`OneOf` for a
closed set of strings::

    @dataclass
    class TEMIConfig(MethodConfig):
        heads: int = option(50, Ge(1))                    # a positive integer
        lr: float = option(1e-3, Gt(0))                   # > 0
        momentum: float = option(0.996, Interval(ge=0, le=1))
        norm: str = option("standardize", OneOf(NORMS))
        st_lrs: list[float] = option([1e-3, 1e-2], MinLen(1), each=Gt(0))
        checkpoint: bool = True                            # the annotation alone: true or false

:func:`check_fields` — called once by the config's ``__post_init__`` (``MethodConfig``'s for
every method; ``FixMatchConfig``, ``ICSRConfig``, ``PretrainConfig``, ``AugmentSpec`` and
``Preprocess`` call it themselves) — checks every field: its type from the annotation (``int``
does not take ``True`` or ``2.5``; ``float`` takes ``2``; ``X | None`` takes ``None``) and then
its declared constraints, and raises one line naming the field, the allowed values and the value::

    InputError: heads must be a positive integer; got 0
    InputError: momentum must be in [0, 1]; got 1.5
    InputError: norm must be one of none, l2, standardize, batchnorm; got 'bn'

A subclass that only changes a default (``ICCEHeadsConfig.norm = "batchnorm"``) keeps the
rule its base declared. Rules that relate two fields (``max_neighbors >= k``) stay small
explicit checks in the config's ``__post_init__``, after ``check_fields``.

Why annotated-types and a hand-written validator rather than pydantic (installed here with
typer) or attrs: annotated-types is the shared vocabulary for such constraints (PEP 593
metadata; pydantic, hypothesis and others read the same objects), tiny, pure Python, with no
dependencies; but it validates nothing by design. pydantic dataclasses would: at the price of
changing how the 19 config classes are built (values coerced and copied, annotations evaluated at
class creation under ``from __future__ import annotations``, choices only as ``Literal``
types, which :func:`imgclust.config.check_types` cannot read), multi-line ValidationErrors
that need re-wording into our one-line InputError anyway, and a heavy core for what is the
~70-line loop below. This module imports nothing from imgclust but errors, so every layer
(data, backbones, refine, methods, pretrain) can use it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import annotated_types as at

from imgclust.errors import InputError

__all__ = ["SEED_MAX", "OneOf", "Rule", "check_fields", "check_value", "describe", "field_rules", "option", "rule",
           "rule_of"]

#: numpy's legacy seeding and most libraries take a 32-bit seed (also used by imgclust.validate)
SEED_MAX = 2**32 - 1
RULE_KEY = "imgclust.rule"  # the key of a dataclass field's metadata holding its Rule


@dataclass(frozen=True)
class OneOf:
    """The value must be one of ``choices`` (annotated-types has no such constraint: there it
    is the type ``Literal[...]``, which cannot be built from a module's tuple of names)."""

    choices: tuple

    def __init__(self, choices: Any) -> None:
        object.__setattr__(self, "choices", tuple(choices))


_SUPPORTED = (at.Gt, at.Ge, at.Lt, at.Le, at.MinLen, at.MaxLen, OneOf)


def _flat(constraints: Any) -> tuple:
    out: list = []
    for c in constraints:
        if isinstance(c, Rule):  # another field's rule (rule_of): its constraints
            out.extend(c.constraints)
        elif isinstance(c, at.GroupedMetadata):  # Interval, Len -> their parts
            out.extend(_flat(tuple(c)))
        elif isinstance(c, _SUPPORTED):
            out.append(c)
        else:  # a programming error in a config declaration, not bad input
            raise TypeError(f"unsupported constraint {c!r}; use Gt/Ge/Lt/Le/Interval/MinLen/MaxLen/Len/OneOf")
    return tuple(out)


@dataclass(frozen=True)
class Rule:
    """What a field accepts besides its annotated type: constraints on the value, and on each
    element (lists); ``why`` is appended to the error message."""

    constraints: tuple = ()
    each: tuple = ()
    why: str = ""


def rule(*constraints: Any, each: Any = (), why: str = "") -> dict[str, Rule]:
    """Field metadata: ``field(default=..., metadata=rule(Gt(0)))``; a constraint may be another
    field's :func:`rule_of` (its constraints, ``each`` and ``why`` are taken over)."""
    each = each if isinstance(each, (tuple, list)) else (each,)
    borrowed = [c for c in constraints if isinstance(c, Rule)]
    each = tuple(each) + tuple(x for r in borrowed for x in r.each)
    why = why or next((r.why for r in borrowed if r.why), "")
    return {RULE_KEY: Rule(_flat(constraints), _flat(each), why)}


def option(default: Any, *constraints: Any, each: Any = (), why: str = "") -> Any:
    """A dataclass field with a default and a :func:`rule`; list / dict defaults are copied per instance."""
    md = rule(*constraints, each=each, why=why)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=functools.partial(copy.copy, default), metadata=md)
    return dataclasses.field(default=default, metadata=md)


# ----------------------------------------------------------------------------- the validator
_KINDS = {"int", "float", "bool", "str", "list", "tuple", "dict", "None"}


def _kinds(annotation: Any) -> frozenset[str] | None:
    """Base types of an annotation string such as ``"list[float] | None"``; None: not checked."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = {part.strip().split("[", 1)[0].strip() for part in text.split("|")}
    return frozenset(kinds) if kinds <= _KINDS else None


def _has_type(kinds: frozenset[str], v: Any) -> bool:
    if v is None:
        return "None" in kinds
    if isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")):
        # numpy's bool too; a bool is not a count
        return "bool" in kinds
    if isinstance(v, numbers.Integral):  # numpy integers too
        return bool(kinds & {"int", "float"})
    if isinstance(v, numbers.Real):
        return "float" in kinds
    if isinstance(v, str):
        return "str" in kinds
    if isinstance(v, (list, tuple)):
        return bool(kinds & {"list", "tuple"})
    return isinstance(v, Mapping) and "dict" in kinds


def _satisfies(c: Any, v: Any) -> bool:
    # written as "not (v > lo)" style comparisons so NaN fails every bound
    if isinstance(c, OneOf):
        return isinstance(v, str) and v in c.choices
    if isinstance(c, (at.MinLen, at.MaxLen)):
        n = len(v)
        return n >= c.min_length if isinstance(c, at.MinLen) else n <= c.max_length
    try:
        if isinstance(c, at.Gt):
            return bool(v > c.gt)
        if isinstance(c, at.Ge):
            return bool(v >= c.ge)
        if isinstance(c, at.Lt):
            return bool(v < c.lt)
        return bool(v <= c.le)
    except TypeError:  # e.g. a string in a list of numbers
        return False


def _num(x: Any) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bounds(constraints: tuple, integer: bool, plural: bool) -> str:
    lo = next(((">", c.gt) for c in constraints if isinstance(c, at.Gt)), None) or next(
        ((">=", c.ge) for c in constraints if isinstance(c, at.Ge)), None)
    hi = next(((c.lt, ")", "<") for c in constraints if isinstance(c, at.Lt)), None) or next(
        ((c.le, "]", "<=") for c in constraints if isinstance(c, at.Le)), None)
    noun = ("integers" if plural else "an integer") if integer else ("numbers" if plural else "a number")
    if integer and lo == (">=", 1) and hi is None:
        return "positive integers" if plural else "a positive integer"
    if lo and hi:
        what = f"in {'(' if lo[0] == '>' else '['}{_num(lo[1])}, {_num(hi[0])}{hi[1]}"
    elif lo or hi:
        what = f"{lo[0]} {_num(lo[1])}" if lo else f"{hi[2]} {_num(hi[0])}"
    else:
        return noun
    return f"{noun} {what}" if integer or plural else what


def describe(kinds: frozenset[str] | None, r: Rule) -> str:
    """The allowed values in words: ``"a positive integer"``, ``"in (0, 1]"``, ``"one of a, b"``."""
    kinds = kinds or frozenset()
    choice = next((c for c in r.constraints if isinstance(c, OneOf)), None)
    if choice is not None:
        text = f"one of {', '.join(map(str, choice.choices))}"
    elif kinds & {"list", "tuple"}:
        min_len = max((c.min_length for c in r.constraints if isinstance(c, at.MinLen)), default=0)
        text = "a non-empty list" if min_len == 1 else f"a list of at least {min_len}" if min_len else "a list"
        max_len = min((c.max_length for c in r.constraints if isinstance(c, at.MaxLen)), default=None)
        if max_len is not None:
            text += f"{' and' if min_len else ' of'} at most {max_len}"
        each_choice = next((c for c in r.each if isinstance(c, OneOf)), None)
        if each_choice is not None:
            text += f" of {', '.join(map(str, each_choice.choices))}"
        elif r.each:
            text += f" of {_bounds(r.each, integer=False, plural=True)}"
    elif "bool" in kinds:
        text = "true or false"
    elif kinds & {"int", "float"}:
        text = _bounds(r.constraints, integer="float" not in kinds, plural=False)
    elif "str" in kinds:
        text = "a string"
    elif "dict" in kinds:
        text = "a table of options"
    else:
        text = "valid"
    if "None" in kinds:
        text += " or none"
    return f"{text} ({r.why})" if r.why else text


@functools.cache
def field_rules(cls: type) -> tuple[tuple[str, frozenset[str] | None, Rule], ...]:
    """(name, annotated kinds, rule) of every field of a config class; a field redeclared by a
    subclass without a rule (a new default only) keeps its nearest base's rule."""
    out = []
    for f in dataclasses.fields(cls):
        r = None
        for base in cls.__mro__:
            bf = getattr(base, "__dataclass_fields__", {}).get(f.name)
            if bf is not None and RULE_KEY in bf.metadata:
                r = bf.metadata[RULE_KEY]
                break
        out.append((f.name, _kinds(f.type), r or Rule()))
    return tuple(out)


def rule_of(cls: type, name: str) -> Rule:
    """The rule of field ``name`` of config class ``cls``, to declare the same range on another
    config's field (``SPICEConfig.semi_lr`` takes ``FixMatchConfig.lr``'s)."""
    for fname, _, r in field_rules(cls):
        if fname == name:
            return r
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def check_value(name: str, value: Any, kinds: frozenset[str] | None, r: Rule) -> None:
    """One field: the annotated type, then the rule; a one-line InputError otherwise."""
    ok = kinds is None or _has_type(kinds, value)
    if ok and value is not None:
        ok = all(_satisfies(c, value) for c in r.constraints)
        if ok and r.each and isinstance(value, (list, tuple)):
            ok = all(all(_satisfies(c, x) for c in r.each) for x in value)
    if not ok:
        raise InputError(f"{name} must be {describe(kinds, r)}; got {value!r}")


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its type and declared rule."""
    for name, kinds, r in field_rules(type(obj)):
        check_value(name, getattr(obj, name), kinds, r)
