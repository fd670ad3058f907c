"""Several backbones at once: ``--backbone efficientnet-lite0,pixels``.

TURTLE (Gadetsky et al., ICML 2024, sec. 4) finds that searching for the labelling in the
representation spaces of two foundation models at once beats either alone. Here each
backbone's features are extracted and **cached separately** (the ordinary feature cache,
one entry per backbone, so adding or dropping a backbone re-extracts nothing), then
combined by one fixed, stateless rule:

    z = concat_s( x_s / |x_s| / sqrt(S) )        s = 1..S spaces, per image

i.e. every space is L2-normalised per image and weighted equally, so the combined row has
unit norm and the cosine similarity of two images in the combined space is the *mean* of
their cosine similarities in the S spaces. Being per image, the rule needs no statistics of
the fitting set: new images are combined the same way, nothing extra is saved with the
model, and the result is deterministic (the order of backbones in the list is kept).
Whitening, if wanted, is the feature stage's ``pca``/``pca_whiten`` on top. (The issue's
alternative, per-space heads trained jointly, is not implemented.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imgclust.errors import InputError


def split_names(backbone: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (stripped; duplicates refused)."""
    names = [str(n).strip() for n in (backbone.split(",") if isinstance(backbone, str) else backbone)]
    names = [n for n in names if n]
    if not names:
        raise InputError("no backbone given")
    if len(set(names)) != len(names):
        raise InputError(f"backbone listed twice in {','.join(names)}")
    return names


def is_combined(backbone: Any) -> bool:
    return (isinstance(backbone, str) and "," in backbone) or isinstance(backbone, (list, tuple))


class CombinedBackbone:
    """Stands in for one backbone where the API needs ``name``/``dim``/``weights_id``/``describe``."""

    def __init__(self, members: list) -> None:
        if len(members) < 2:
            raise InputError("a combined backbone needs at least two backbones")
        self.members = members
        self.name = ",".join(m.name for m in members)
        self.dim = int(sum(m.dim for m in members))
        self.weights_id = "|".join(f"{m.name}:{m.weights_id}" for m in members)

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "weights": self.weights_id,
                "combine": "per-image L2 per space / sqrt(S), concatenated",
                "members": [m.describe() for m in self.members]}


def build_combined(backbone: str | list[str], weights: str | None = None, **opts: Any) -> CombinedBackbone:
    """Build every listed backbone (the same options for each; ``weights`` only for one backbone)."""
    from imgclust.backbones import build_backbone

    names = split_names(backbone)
    if weights is not None:
        raise InputError("--weights applies to one backbone; with a list of backbones give each its default weights")
    return CombinedBackbone([build_backbone(n, **opts) for n in names])


def combine_spaces(spaces: list[np.ndarray]) -> np.ndarray:
    """The combination rule of the module doc: (N, sum D_s) float32."""
    if not spaces:
        raise InputError("nothing to combine")
    n = len(spaces[0])
    if any(len(s) != n for s in spaces):
        raise InputError("feature spaces have different numbers of rows")
    w = 1.0 / np.sqrt(len(spaces))
    out = []
    for s in spaces:
        x = np.asarray(s, dtype=np.float32)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        out.append(x / np.maximum(norm, 1e-12) * w)
    return np.ascontiguousarray(np.concatenate(out, axis=1), dtype=np.float32)


def extract_combined(source, combined: CombinedBackbone, *, cache_dir: str | Path | None = None, **kw: Any):
    """Extract (or read from the cache) every member's features, then combine them.

    Returns a :class:`imgclust.features.FeatureSet` whose rows are valid when the image
    decoded for every backbone; ``path`` is the first member's cache entry (neighbour and
    reduce caches are keyed by the feature bytes, so sharing the folder is safe) and
    ``key`` joins the members' keys.
    """
    from imgclust.features import FeatureSet
    from imgclust.features_dist import extract_features  # sharded under torchrun (issue 20)

    sets = [extract_features(source, m, cache_dir=cache_dir, **kw) for m in combined.members]
    valid = np.logical_and.reduce([fs.valid for fs in sets])
    feats = combine_spaces([fs.features for fs in sets])
    feats[~valid] = 0.0
    skipped = {int(i): (int(i), sid, why) for fs in sets for (i, sid, why) in fs.skipped}
    return FeatureSet(feats, valid, [skipped[i] for i in sorted(skipped)], key="+".join(fs.key for fs in sets),
                      path=sets[0].path, from_cache=all(fs.from_cache for fs in sets),
                      seconds=float(sum(fs.seconds for fs in sets)),
                      rows_computed=int(sum(fs.rows_computed for fs in sets)),
                      cache_status="+".join(fs.cache_status for fs in sets))
