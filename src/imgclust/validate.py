"""Check a whole run's settings before any work starts, and bound untrusted model settings.

Issue 22: ``--method nosuch`` used to fail only after feature extraction (minutes on real
data), unknown backbone options were silently ignored, and out-of-range numbers
(``--seed -1``, ``--pca -5``, ``--workers -2``) ended in tracebacks. :func:`check_run_config`
runs first in :func:`imgclust.run.cluster` and checks, without touching any image: K and the
K range, the seed, every numeric range, the method and its options, the backbone name and
its options (by building the backbone; building loads local weights, which extraction would
do a moment later anyway), the device, and that one backbone batch fits a memory bound.

:func:`check_model_params` applies the same ranges to a ``model.json`` (data from elsewhere):
every field has a type and a range, sizes are bounded before anything is allocated, and no
field chooses where we write (``cache_dir`` from a model is ignored).
"""

from __future__ import annotations

from typing import Any

from imgclust.configcheck import SEED_MAX  # one definition: run settings here, config fields there
from imgclust.errors import InputError

IMAGE_SIZE_RANGE = (8, 4096)
BATCH_SIZE_MAX = 65536
K_MAX = 1_000_000
K_RANGE_MAX_CANDIDATES = 1000
WORKERS_MAX = 1024
#: One float32 input batch (batch x 3 x size x size x 4 bytes) must fit this; EfficientNet-Lite0
#: at 224 px and batch 64 needs 38 MB, 1024 px and batch 64 about 0.8 GB.
BATCH_BYTES_MAX = 4 << 30


def _int(name: str, v: Any, lo: int | None = None, hi: int | None = None, none_ok: bool = False) -> None:
    if v is None and none_ok:
        return
    if not isinstance(v, int) or isinstance(v, bool):
        raise InputError(f"{name} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise InputError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise InputError(f"{name} must be <= {hi}, got {v}")


def check_seed(seed: Any, name: str = "seed") -> None:
    _int(name, seed, 0, SEED_MAX)


def check_sizes(image_size: Any, batch_size: Any, what: str = "") -> None:
    _int(f"{what}image size", image_size, *IMAGE_SIZE_RANGE, none_ok=True)
    _int(f"{what}batch size", batch_size, 1, BATCH_SIZE_MAX)
    size = image_size or 224
    need = batch_size * 3 * size * size * 4
    if need > BATCH_BYTES_MAX:
        raise InputError(f"{what}batch size {batch_size} at {size} px needs {need / 2**30:.1f} GiB per batch "
                         f"(limit {BATCH_BYTES_MAX / 2**30:.0f} GiB); lower the batch size or the image size")


def check_method(method: Any, k: int | str, options: dict[str, Any] | None) -> None:
    """The method exists and accepts ``options`` (names, types and its own range checks)."""
    from imgclust.methods import get_method

    if not isinstance(method, str):
        raise InputError(f"method must be a string, got {method!r}")
    cls = get_method(method)
    if options is not None and not isinstance(options, dict):
        raise InputError(f"method options must be a table/object, got {type(options).__name__}")
    cls(k if isinstance(k, int) else 2, dict(options or {}))


def build_checked_backbone(name: str, weights: str | None, image_size: int | None, options: dict[str, Any] | None):
    """``build_backbone`` with unknown options as an InputError instead of a TypeError."""
    from imgclust.backbones import build_backbone

    opts = dict(options or {})
    if "image_size" in opts:
        _int("backbone option image_size", opts["image_size"], *IMAGE_SIZE_RANGE)
    if image_size is not None:
        opts["image_size"] = int(image_size)
    try:
        return build_backbone(name, weights=weights, **opts)
    except TypeError as e:
        if "unexpected keyword" in str(e) or "got an unexpected" in str(e):
            bad = sorted(set(options or {}) - {"image_size"})
            raise InputError(f"unknown backbone option(s) {bad} for {name!r} ({e})") from None
        raise


def check_run_config(cfg: Any) -> Any:
    """Validate a :class:`~imgclust.config.RunConfig` before any work; returns the built backbone."""
    k = cfg.k
    if k != "auto":
        if isinstance(k, int) and not isinstance(k, bool) and k < 2:
            raise InputError(f"K must be at least 2 (or 'auto'), got {k!r}")
        _int("K", k, 2, K_MAX)
    else:
        from imgclust.choosek import parse_k_range

        spec = cfg.k_range
        if not isinstance(spec, (str, list, tuple)):
            raise InputError(f"k_range must be a string like 2:20, got {spec!r}")
        if isinstance(spec, str) and ":" in spec:  # bound lo:hi before the list is materialised
            try:
                parts = [int(p) for p in spec.split(":")]
            except ValueError:
                parts = []
            if len(parts) in (2, 3) and (parts[2] if len(parts) == 3 else 1) >= 1:
                step = parts[2] if len(parts) == 3 else 1
                if (parts[1] - parts[0]) // step + 1 > K_RANGE_MAX_CANDIDATES:
                    raise InputError(f"K range {spec} has more than {K_RANGE_MAX_CANDIDATES} candidates")
        ks = parse_k_range(spec)
        if len(ks) > K_RANGE_MAX_CANDIDATES or ks[-1] > K_MAX:
            raise InputError(f"K range {spec} is too large (at most {K_RANGE_MAX_CANDIDATES} candidates, K <= {K_MAX})")
    check_seed(cfg.seed)
    s, f, b = cfg.source, cfg.features, cfg.backbone
    _int("limit", s.limit, 1, none_ok=True)
    _int("max pixels", s.max_pixels, 1, none_ok=True)
    if s.labels not in ("auto", "folder", "none"):
        raise InputError(f"labels must be auto, folder or none, got {s.labels!r}")
    _int("pca", f.pca, 0, none_ok=True)
    _int("workers", f.workers, 1, WORKERS_MAX, none_ok=True)
    _int("chunk rows", f.chunk_rows, 1)
    check_sizes(b.image_size, f.batch_size)
    from imgclust.features import resolve_device

    if not isinstance(f.device, str):
        raise InputError(f"device must be a string, got {f.device!r}")
    resolve_device(f.device)
    check_method(cfg.method, k, cfg.method_options)
    if not isinstance(b.options, dict):
        raise InputError("backbone options must be a table")
    return build_checked_backbone(b.name, b.weights, b.image_size, b.options)


#: ``model.json`` params that choose where we write: ignored on load (the caller's value wins).
MODEL_PARAMS_IGNORED = ("cache_dir",)


def check_model_params(params: dict[str, Any]) -> None:
    """Ranges of a model.json's ``params`` (types were checked against ``__init__``'s annotations)."""
    _int("n_clusters", params.get("n_clusters", 10), 2, K_MAX)
    check_seed(params.get("seed", 0))
    check_sizes(params.get("image_size"), params.get("batch_size", 64))
    _int("pca", params.get("pca"), 0, 1 << 20, none_ok=True)
    _int("workers", params.get("workers"), 1, WORKERS_MAX, none_ok=True)
    _int("chunk_rows", params.get("chunk_rows", 1024), 1, 1 << 24)
    opts = params.get("backbone_options") or {}
    for key, v in opts.items():
        if not isinstance(v, (str, int, float, bool)) or v is None:
            raise InputError(f"backbone option {key!r} must be a plain value, got {type(v).__name__}")
    if "image_size" in opts:
        check_sizes(opts["image_size"], params.get("batch_size", 64), "backbone option ")
    for key in ("method", "backbone", "precision", "device"):
        v = params.get(key)
        if v is not None and (not isinstance(v, str) or len(v) > 4096):
            raise InputError(f"{key} must be a short string")
    check_method(params.get("method", "kmeans"), params.get("n_clusters", 10), None)
