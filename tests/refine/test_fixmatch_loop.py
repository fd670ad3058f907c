"""FixMatch on the shared training loop: a killed run resumes from its checkpoint to the same EMA
model and history as an uninterrupted run; distill_head still fits its labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from imgclust.heads.spice import MultiHeadMLP
from imgclust.methods.spice import SingleHead
from imgclust.refine.fixmatch import FixMatchConfig, distill_head, train_fixmatch
from imgclust.train.checkpoint import Checkpoint


class _Views:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def sample(self, kind: str, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        v = self.x[idx]
        return v if kind != "strong" else v + 0.5 * torch.randn(v.shape, generator=g)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return torch.from_numpy(x[:300].astype(np.float32)), y[:300]


def _run(x: torch.Tensor, y: np.ndarray, ckpt: Checkpoint | None):
    g = torch.Generator().manual_seed(0)
    mlp = MultiHeadMLP(64, 10, 1, 32, "standardize", generator=g)
    mlp.set_standardization(x.mean(0), x.std(0).clamp(min=1.0))
    cfg = FixMatchConfig(steps=60, batch_size=16, mu=2)
    return train_fixmatch(SingleHead(mlp), _Views(x), np.arange(0, 300, 3), y[0:300:3], 300, cfg, g,
                          progress=False, checkpoint=ckpt)


def test_killed_fixmatch_resumes_bit_identically(digits, tmp_path, monkeypatch):
    x, y = digits
    whole, info = _run(x, y, None)
    assert info["every"] == 1 and len(info["loss"]) == 60 and "resumed_at" not in info
    ckpt = Checkpoint(tmp_path / "fm.pt", "fm-test")
    save, calls = Checkpoint.save, []

    def save_then_die(self, payload):
        save(self, payload)
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(x, y, ckpt)
    monkeypatch.setattr(Checkpoint, "save", save)
    resumed, rinfo = _run(x, y, ckpt)
    assert rinfo["resumed_at"] == 25
    for k in ("loss", "supervised", "unsupervised", "mask_rate"):
        assert rinfo[k] == info[k], k
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    # the EMA model learnt the labels it was given (digits, one third labelled)
    assert (whole(x).argmax(1).numpy() == y).mean() > 0.8


def test_distill_head_fits_hard_labels(digits):
    x, y = digits
    g = torch.Generator().manual_seed(1)
    head = distill_head(SingleHead(MultiHeadMLP(64, 10, 1, 32, "l2", generator=g)), x,
                        torch.from_numpy(y).long(), epochs=40, lr=1e-2, generator=g)
    assert not head.training
    assert (head(x).argmax(1).numpy() == y).mean() > 0.9
