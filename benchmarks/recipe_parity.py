"""Digests of the image-level and two-stage paths of the method recipes (issue 17, items 5-6).

``shape_parity.py`` covers the feature-level methods and ``port_identity.py`` the trainers;
this script adds the paths that moved in the recipe refactor: SPICE with SPICE-Semi (FixMatch
on the head, and end to end on a trainable copy of a small CNN backbone), ICBPL's image view
bank (``aug=views``) and its fine-tuning (``finetune=all`` / ``last_blocks`` style through a
trainable copy), each on 60 or 1,797 digits. Every row hashes the labels, the probabilities
and the loss history. Run it with the old and the new source on PYTHONPATH; identical rows =
identical results::

    PYTHONPATH=/path/to/old/src python benchmarks/recipe_parity.py
    PYTHONPATH=src python benchmarks/recipe_parity.py
"""

from __future__ import annotations

import tempfile
import warnings

import numpy as np
import torch
from port_identity import _digest  # same digest as the ports' parity rows (benchmarks/ is the script dir)
from sklearn.datasets import load_digits


def _tiny_cnn():
    from imgclust.backbones.base import Backbone, Preprocess

    class TinyCNN(Backbone):
        def __init__(self) -> None:
            super().__init__()
            self.name, self.dim, self.weights_id = "tiny-cnn", 16, "random"
            self.preprocess = Preprocess(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.requires_grad_(False)

        def forward(self, x):
            return self.net(x)

    return TinyCNN()


def _losses(h: dict, keys) -> dict:
    return {k: h.get(k) for k in keys}


def spice_rows() -> dict[str, str]:
    from imgclust.data.base import ArraySource
    from imgclust.features import extract_features
    from imgclust.methods import FitContext, get_method

    x, _ = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    out = {}
    opts = {"epochs": 4, "heads": 3, "hidden": 32, "views": "none", "pool_size": 600, "semi_steps": 60,
            "reliable_neighbors": 20, "reliable_threshold": 0.9}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = get_method("spice")(10, opts).fit(x, FitContext(seed=0, progress=False))
    out["spice_head"] = _digest(m.labels_, m.predict_proba(x), _losses(m.history_, ("train_loss", "select_loss")),
                                m.history_["semi"]["loss"])
    d = load_digits()
    src = ArraySource((d.images[:60] * (255 / 16)).astype(np.uint8), d.target[:60], name="digits60")
    cnn = _tiny_cnn()
    feats = np.asarray(extract_features(src, cnn, use_cache=False, progress=False).features)
    e2e = {"epochs": 2, "heads": 2, "hidden": 8, "pool_size": 60, "n_views": 1, "semi_steps": 5, "semi_batch_size": 8,
           "mu": 2, "reliable_neighbors": 5, "reliable_threshold": 0.5, "distill_epochs": 2, "semi_min_clusters": 0.0,
           "views": "bank", "semi_mode": "end_to_end"}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = FitContext(seed=0, progress=False, work_dir=tmp, source=src, backbone=cnn, rows=np.arange(60))
        m = get_method("spice")(10, e2e).fit(feats, ctx)
    out["spice_end_to_end"] = _digest(m.labels_, m.predict_proba(feats), m.history_["semi"]["loss"],
                                      m.history_["semi"]["distilled_agreement"])
    return out


def icbpl_rows() -> dict[str, str]:
    from imgclust.backbones import build_backbone
    from imgclust.data.base import ArraySource
    from imgclust.features import extract_features
    from imgclust.methods import FitContext, get_method

    d = load_digits()
    src = ArraySource((d.images[:120] * (255 / 16)).astype(np.uint8), d.target[:120], name="digits120")
    out = {}
    keys = ("loss", "mmd", "aug", "knn", "pedcc_loss", "refresh_overlap")
    px = build_backbone("pixels", image_size=8)
    feats = np.asarray(extract_features(src, px, use_cache=False, progress=False).features)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = FitContext(seed=0, progress=False, work_dir=tmp, source=src, backbone=px, rows=np.arange(120))
        m = get_method("icbpl")(10, {"epochs": 6, "aug": "views", "views": 2, "refresh_every": 3}).fit(feats, ctx)
    out["icbpl_views"] = _digest(m.labels_, m.predict_proba(feats), _losses(m.history_, keys))
    cnn = _tiny_cnn()
    feats = np.asarray(extract_features(src, cnn, use_cache=False, progress=False).features)
    for mode in ("all",):
        with tempfile.TemporaryDirectory() as tmp:
            ctx = FitContext(seed=0, progress=False, work_dir=tmp, source=src, backbone=cnn, rows=np.arange(120))
            m = get_method("icbpl")(10, {"epochs": 4, "finetune": mode, "batch_size": 40, "refresh_every": 2,
                                         "image_size": 8}).fit(feats, ctx)
        out[f"icbpl_finetune_{mode}"] = _digest(m.labels_, m.fit_proba_, _losses(m.history_, keys),
                                                *[m.backbone_state_[k] for k in sorted(m.backbone_state_)])
        p = m.predict_proba_images(src, cnn, progress=False)
        out[f"icbpl_finetune_{mode}_predict"] = _digest(p)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    rows = {**spice_rows(), **icbpl_rows()}
    print(f"{'path':<28} digest")
    for k, v in rows.items():
        print(f"{k:<28} {v}")
