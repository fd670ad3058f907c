"""The refiner protocol and registry (issue 17): ``imgclust refine --method NAME`` looks refiners
up here, as ``imgclust cluster --method`` looks methods up in :mod:`imgclust.methods.base`.

A refiner improves a *fitted* model. Its trained state is a registered clustering method
(:attr:`RefinerInfo.method`, e.g. ``icsr``), so the refined model is saved, loaded and used by
``imgclust predict`` like any other. That method's contract, checked by the refine job
(:func:`imgclust.run.refine_estimator`):

* its config has ``base`` and ``base_options`` (the method that produced the model being
  refined: recorded, so a refined model can be refined again from the same base);
* its ``fit`` reads the fitted model's probabilities of the rows from ``ctx.base_proba``
  (and ``ctx.truth`` for label diagnostics only).

:attr:`RefinerInfo.outputs` turns the fitted method's options and history into the refiner's own
diagnostics file (e.g. ``icsr.json``) and extra ``run.json`` fields. This module imports no
method and no run job: refiners register themselves from their own modules (listed in
``BUILTIN``), loaded on first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imgclust.errors import InputError

#: (diagnostics written to ``RefinerInfo.diagnostics``, extra run.json fields)
Outputs = Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]


def _no_outputs(options: dict[str, Any], history: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"options": options, "history": history}, {}


@dataclass(frozen=True)
class RefinerInfo:
    name: str  # ``imgclust refine --method NAME``
    method: str  # the registered clustering method that holds the refined model
    description: str = ""
    diagnostics: str | None = None  # file in the refined run (e.g. "icsr.json")
    outputs: Outputs = _no_outputs  # (options, history) -> (diagnostics, extra run.json fields)


_REFINERS: dict[str, RefinerInfo] = {}
BUILTIN = ("imgclust.refine.icsr",)  # modules that register refiners; imported on first lookup


def register_refiner(info: RefinerInfo) -> RefinerInfo:
    if not info.name or info.name in _REFINERS:
        raise ValueError(f"refiner name {info.name!r} missing or registered twice")
    _REFINERS[info.name] = info
    return info


def _load_builtin() -> None:
    for mod in BUILTIN:  # by name, like the backbone families: this module stays below them
        importlib.import_module(mod)


def available_refiners() -> dict[str, RefinerInfo]:
    _load_builtin()
    return dict(sorted(_REFINERS.items()))


def get_refiner(name: str) -> RefinerInfo:
    _load_builtin()
    if name not in _REFINERS:
        raise InputError(f"unknown refiner {name!r}; available: {', '.join(sorted(_REFINERS))}")
    return _REFINERS[name]


__all__ = ["BUILTIN", "RefinerInfo", "available_refiners", "get_refiner", "register_refiner"]
