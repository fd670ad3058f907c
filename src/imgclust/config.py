"""Typed run configuration: dataclasses, read from TOML, recorded in run.json.

A TOML file mirrors the dataclasses::

    k = 10
    method = "kmeans"
    seed = 0
    [source]
    path = "photos/"
    [backbone]
    name = "efficientnet-lite0"
    [features]
    batch_size = 64
    [method_options]
    n_init = 10
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from imgclust.errors import InputError


@dataclass
class SourceConfig:
    path: str = "digits"
    split: str | None = None  # train | test | all | unlabeled (benchmark layouts, or a sub-folder)
    kind: str = "auto"  # force a reader: folder, archive, npz, cifar10, cifar100, mnist, stl10, digits ...
    labels: str = "auto"  # auto | folder | none (labels from the first sub-folder level)
    coarse: bool = False  # CIFAR-100: the 20 super-classes
    limit: int | None = None  # use a random subset of this many images (seeded by the run's seed)
    max_pixels: int | None = None  # refuse images with more pixels (default ~179 Mpx; decompression bombs)
    fingerprint: str | None = None  # recorded by a run; a re-run whose images differ warns (imgclust.config.portable)


@dataclass
class BackboneConfig:
    name: str = "efficientnet-lite0"
    weights: str | None = None  # local weights file (replaces any download)
    image_size: int | None = None  # override the backbone's input size
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"feature": "cls+mean"} for ViTs


@dataclass
class FeatureConfig:
    batch_size: int = 64
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int | None = None  # decoding threads
    cache_dir: str | None = None  # default $IMGCLUST_CACHE or ~/.cache/imgclust
    pca: int | None = None  # reduce features to this many dimensions before clustering
    pca_whiten: bool = False  # scale PCA components to unit variance (helps k-means on CNN features)
    reduce: str | None = None  # manifold stage before the method: umap:D | spectral:D (imgclust.reduce)
    chunk_rows: int = 1024  # feature rows between two flushes of the cache (what an interruption can lose)
    engine: str = "auto"  # auto | torch | openvino | onnxruntime (issue 19; precision may then be int8)


@dataclass
class RunConfig:
    k: int | str = 10  # number of clusters, or "auto": chosen from k_range (imgclust.choosek)
    k_range: str = "2:20"  # candidates for k = "auto": "lo:hi", "lo:hi:step" or "5,10,20"
    report: bool = True  # write report.html at the end of the run (imgclust.report)
    report_map: str = "auto"  # the report's 2-D map: auto | umap | tsne | pca
    method: str = "auto"  # issue 18 (was kmeans): label-free pick among kmeans, spectral-kmeans
    seed: int = 0
    threads: int | str | None = None  # torch/faiss/BLAS/numba threads: a count, or "auto"/None (imgclust.threads)
    source: SourceConfig = field(default_factory=SourceConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    method_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        subs = {"source": SourceConfig, "backbone": BackboneConfig, "features": FeatureConfig}
        kw: dict[str, Any] = {}
        for name, sub in subs.items():
            kw[name] = _build(sub, d.pop(name, {}) or {}, name)
        top = {f.name for f in fields(cls)} - set(subs)
        unknown = sorted(set(d) - top)
        if unknown:
            raise InputError(f"unknown config key(s) {unknown}; allowed: {sorted(top | set(subs))}")
        check_types(cls, d, "")
        if isinstance(d.get("k"), str) and d["k"] != "auto":
            raise InputError(f"config key 'k' must be int, got str {d['k']!r} (the only string allowed is \"auto\")")
        if "threads" in d and d["threads"] is not None:  # a count >= 1, or "auto" (imgclust.threads)
            from imgclust.threads import resolve_threads

            resolve_threads(d["threads"])
        kw.update(d)
        return cls(**kw)


def _build(cls: type, d: dict[str, Any], section: str) -> Any:
    if not isinstance(d, dict):
        raise InputError(f"config section [{section}] must be a table")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(f"unknown key(s) {unknown} in [{section}]; allowed: {sorted(names)}")
    check_types(cls, d, section)
    return cls(**d)


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float, int),
    "str": (str,),
    "bool": (bool,),
    "None": (type(None),),
    "dict": (dict,),
    "list": (list, tuple),
    "tuple": (list, tuple),
}


def _allowed_types(annotation: Any) -> tuple[type, ...] | None:
    """Python types a dataclass field annotation (a string here) accepts; None = not checked.

    Understands unions of int, float, str, bool, None, dict[...], list[...], tuple[...];
    anything else (Literal, custom classes) is left unchecked.
    """
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", str(annotation))
    out: list[type] = []
    for part in annotation.split("|"):
        base = part.strip().split("[", 1)[0].strip()
        if base not in _SIMPLE_TYPES:
            return None
        out.extend(_SIMPLE_TYPES[base])
    return tuple(out)


def check_types(cls: type | dict[str, Any], values: dict[str, Any], section: str) -> None:
    """Raise InputError naming the key when a value has the wrong type for ``cls``'s field.

    ``cls`` is a dataclass, or a mapping of names to annotations (strings like ``"int | None"``).

    Configs are data from a file or a command line: ``k = "ten"`` must end in one clear
    line, not in a TypeError deep inside a run. ``bool`` is not accepted for ``int``
    fields (TOML ``true`` is not a count).
    """
    where = f" in [{section}]" if section else ""
    spec = cls if isinstance(cls, dict) else {f.name: f.type for f in fields(cls)}
    for name, annotation in spec.items():
        if name not in values:
            continue
        allowed = _allowed_types(annotation)
        if allowed is None:
            continue
        v = values[name]
        ok = isinstance(v, allowed) and not (isinstance(v, bool) and bool not in allowed)
        if not ok:
            want = " or ".join(sorted({t.__name__ if t is not type(None) else "none" for t in allowed}))
            raise InputError(f"config key {name!r}{where} must be {want}, got {type(v).__name__} {v!r}")


def parse_options(items: list[str] | None, what: str = "--option") -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, true/false, lists).

    Used by the CLI's ``--option`` / ``--backbone-option`` and by the benchmark scripts.
    """
    import json

    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise InputError(f"{what} must look like key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML run configuration (parsed as data only)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid TOML ({e})") from e
    except RecursionError:
        raise InputError(f"{p}: TOML nested too deeply") from None
    return resolve_relative(RunConfig.from_dict(data), p.resolve().parent)


# --------------------------------------------------------------------- portable paths
def _path_fields(cfg: RunConfig) -> list[tuple[Any, str]]:
    """(object, attribute) of every config value that may be a filesystem path."""
    return [(cfg.source, "path"), (cfg.backbone, "weights"), (cfg.backbone, "name"), (cfg.features, "cache_dir")]


def resolve_relative(cfg: RunConfig, base: str | Path) -> RunConfig:
    """Relative paths in a config file name files next to the config file, not in the current folder.

    A relative value is replaced by ``base / value`` when that exists; otherwise it is kept
    (a source name such as ``digits``, a registered backbone, or a path meant relative to
    the working directory, as before). ``cache_dir`` is always taken relative to ``base``.
    """
    base = Path(base)
    for obj, attr in _path_fields(cfg):
        v = getattr(obj, attr)
        if not isinstance(v, str) or not v or Path(v).expanduser().is_absolute():
            continue
        cand = base / v
        if attr == "cache_dir" or cand.exists():
            setattr(obj, attr, str(cand))
    return cfg


def portable(cfg: RunConfig, fingerprint: str | None = None) -> RunConfig:
    """A copy of ``cfg`` that re-runs from any folder: paths that exist made absolute, and
    the source's fingerprint recorded (a later run on changed images warns)."""
    import copy

    out = copy.deepcopy(cfg)
    for obj, attr in _path_fields(out):
        v = getattr(obj, attr)
        if isinstance(v, str) and v and (attr == "cache_dir" or Path(v).expanduser().exists()):
            setattr(obj, attr, str(Path(v).expanduser().resolve()))
    if fingerprint is not None:
        out.source.fingerprint = fingerprint
    return out


# --------------------------------------------------------------------- writing TOML
# Hand-written because tomllib only reads and the configs hold nothing but strings, numbers,
# booleans, lists and tables: a 40-line writer beats a new dependency (tomli-w).
def _toml_key(k: str) -> str:
    import re

    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def _toml_value(v: Any) -> str:
    import json
    import math

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string (same escapes)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise InputError(f"cannot write a {type(v).__name__} to TOML")


def dump_toml(cfg: RunConfig) -> str:
    """The config as TOML text that :func:`load_config` reads back to an equal config.

    ``None`` values are left out (TOML has no null, and every field that may be ``None``
    defaults to ``None``).
    """
    d = cfg.to_dict()
    tables = {name: d.pop(name) for name in ("source", "backbone", "features", "method_options")}
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items() if v is not None]
    for name, table in tables.items():
        nested = {k: v for k, v in table.items() if isinstance(v, dict)} if name != "method_options" else {}
        lines += ["", f"[{name}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None and k not in nested]
        for sub, val in nested.items():
            lines += ["", f"[{name}.{_toml_key(sub)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(x)}" for k, x in val.items() if x is not None]
    return "\n".join(lines) + "\n"


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write ``cfg`` as TOML (atomically); ``imgclust cluster --config PATH`` re-runs it."""
    from imgclust.rundir import atomic_open

    p = Path(path)
    with atomic_open(p, "w", encoding="utf-8") as f:
        f.write(dump_toml(cfg))
    return p
