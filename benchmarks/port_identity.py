"""Digests of what the ported trainers produce on fixed small inputs (issue 17, 17-port).

Run it with the old and the new source on PYTHONPATH; identical rows = identical results::

    PYTHONPATH=/path/to/old/src python benchmarks/port_identity.py
    PYTHONPATH=src python benchmarks/port_identity.py

Rows: FixMatch head mode (digits 600, 130 steps, SPICE's SingleHead), distill_head, ICSR head mode
(digits, 12 epochs), PICI (tiny ViT, digits 120, 1 + 2 + 1 epochs), CC (2 epochs), pretrain BYOL
(resnet18, 48 digits, 2 epochs, 1 warm-up epoch). Each digest hashes the trained parameters /
probabilities and the per-epoch history.
"""

from __future__ import annotations

import hashlib
import json
import tempfile

import numpy as np
import torch
from sklearn.datasets import load_digits


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().numpy()
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=float).encode())
    return h.hexdigest()[:16]


def _state(m: torch.nn.Module) -> list[torch.Tensor]:
    return [v for _, v in sorted(m.state_dict().items())]


def fixmatch_rows() -> dict[str, str]:
    from imgclust.heads.spice import MultiHeadMLP
    from imgclust.methods.spice import SingleHead
    from imgclust.refine.fixmatch import FixMatchConfig, distill_head, train_fixmatch

    x, y = load_digits(return_X_y=True)
    x = torch.from_numpy(x.astype(np.float32))[:600]
    y = y[:600]

    class Views:
        def sample(self, kind, idx, g):
            v = x[idx]
            return v if kind == "weak" else v + 0.5 * torch.randn(v.shape, generator=g)

    g = torch.Generator().manual_seed(0)
    mlp = MultiHeadMLP(64, 10, 1, 32, "standardize", generator=g)
    mlp.set_standardization(x.mean(0), x.std(0).clamp(min=1.0))
    ema, info = train_fixmatch(SingleHead(mlp), Views(), np.arange(0, 600, 3), y[0:600:3], 600,
                               FixMatchConfig(steps=130, batch_size=16, mu=3), g, progress=False)
    hist = {k: info[k] for k in ("loss", "supervised", "unsupervised", "mask_rate")}
    g2 = torch.Generator().manual_seed(1)
    head = distill_head(SingleHead(MultiHeadMLP(64, 10, 1, 32, "none", generator=g2)), x, torch.from_numpy(y).long(),
                        epochs=3, generator=g2)
    return {"fixmatch": _digest(*_state(ema), hist), "distill_head": _digest(*_state(head))}


def icsr_row() -> dict[str, str]:
    from imgclust.refine.icsr import ICSRConfig, train_icsr

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(len(y)) < 0.25, rng.integers(0, 10, len(y)), y)
    cfg = ICSRConfig(epochs=12, first_refresh=4, rank_every=4, views="none", rank_on="features")
    r = train_icsr(x.astype(np.float32), np.eye(10, dtype=np.float32)[noisy], 10, cfg, truth=y, seed=3)
    return {"icsr_head": _digest(r.classifier.weight, r.classifier.bias, r.pseudo_labels, r.history["loss"])}


def pici_rows() -> dict[str, str]:
    from imgclust.data.base import ArraySource
    from imgclust.methods import FitContext, get_method

    d = load_digits()
    imgs = (d.images[:120] * (255 / 16)).astype(np.uint8)
    src, y = ArraySource(imgs, d.target[:120], name="digits120"), d.target[:120]
    tiny = {"image_size": 16, "vit_size": "tiny", "depth": 1, "decoder_dim": 32, "decoder_depth": 1,
            "decoder_heads": 4, "pretrain_epochs": 1, "train_epochs": 2, "boost_epochs": 1, "batch_size": 40}
    out = {}
    for name, opts in (("pici", tiny), ("cc", {"image_size": 16, "epochs": 2, "batch_size": 40})):
        m = get_method(name)(10, opts)
        m.fit(np.zeros((120, 1), np.float32),
              FitContext(seed=0, progress=False, extras={"source": src, "rows": np.arange(120), "labels": y}))
        stages = {s: {k: v for k, v in h.items() if k != "images_per_s"} for s, h in m.history_["stages"].items()}
        out[name] = _digest(m.fit_proba_, stages)
    return out


def pretrain_row() -> dict[str, str]:
    from imgclust.data import open_source
    from imgclust.data.base import SubsetSource
    from imgclust.pretrain import PretrainConfig, pretrain

    src = SubsetSource.sample(open_source("digits"), 48, seed=0)
    cfg = PretrainConfig(method="byol", arch="resnet18", epochs=2, image_size=8, batch_size=16, warmup_epochs=1,
                         monitor_size=32, proj_hidden=64, proj_dim=32, pred_hidden=64)
    with tempfile.TemporaryDirectory() as tmp:
        r = pretrain(src, tmp, cfg, device="cpu", progress=False)
        enc = torch.load(f"{tmp}/backbone.pt", weights_only=True)
    losses = [h.get("loss") for h in r["history"]]
    return {"pretrain_byol": _digest(*[enc[k] for k in sorted(enc)], losses), "pretrain_byol_losses": str(losses)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    rows = {**fixmatch_rows(), **icsr_row(), **pici_rows(), **pretrain_row()}
    print(f"{'trainer':<22} digest")
    for k, v in rows.items():
        print(f"{k:<22} {v}")
