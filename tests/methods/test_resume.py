"""A TEMI / ICCE-heads / ICCE / SPICE-Self / ICBPL run killed after an epoch resumes from its
checkpoint to the same labels and training history as an uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest

from imgclust.methods import FitContext, get_method
from imgclust.train import checkpoint as ckpt_mod
from imgclust.train import loop as loop_mod

TEMI = {"heads": 4, "epochs": 3, "batch_size": 128, "k": 10, "warmup_epochs": 1, "momentum": 0.9,
        "center_neighbors": True}
CASES = {
    "temi": TEMI,
    "icce-heads": TEMI,
    "icce": {**TEMI, "consensus": ["hbgf"], "st_epochs": 2, "st_lrs": [0.01], "st_weight_decays": [0.0]},
    "spice-self": {"epochs": 3, "heads": 3, "hidden": 32, "views": "none", "pool_size": 300},
    "icbpl": {"epochs": 3, "refresh_every": 2, "hidden_dim": 64},
}
_DROP = ("epoch_s", "train_s", "neighbors_s", "views_s", "prepare_s", "consensus_s", "mean_epoch_s", "seconds",
         "resumed_from_epoch", "resumed_at_step", "checkpoint", "neighbors")


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the fit may catch it."""


def _comparable(h):
    """The history without wall-clock timings and cache bookkeeping, at every depth."""
    if isinstance(h, dict):
        return {k: _comparable(v) for k, v in h.items() if k not in _DROP}
    return h


@pytest.fixture(scope="module")
def digits(digits_xy):
    x, _ = digits_xy
    return x[:600]


@pytest.mark.parametrize("name", list(CASES))
def test_killed_run_resumes_to_identical_labels(name, digits, tmp_path, monkeypatch):
    opts = CASES[name]
    ref = get_method(name)(10, opts).fit(digits, FitContext(seed=3, progress=False, work_dir=tmp_path / "ref"))
    assert ref.history_["resumed_from_epoch"] is None
    work = tmp_path / "run"
    real_save = ckpt_mod.Checkpoint.save

    def save_then_die(self, payload):
        real_save(self, payload)
        if payload["epoch"] == 1:
            raise Killed  # the process dies right after epoch 1's checkpoint is on disk

    monkeypatch.setattr(ckpt_mod.Checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        get_method(name)(10, opts).fit(digits, FitContext(seed=3, progress=False, work_dir=work))
    monkeypatch.setattr(ckpt_mod.Checkpoint, "save", real_save)
    assert len(list(work.glob(f"{get_method(name).name}-ckpt-*.pt"))) == 1

    m = get_method(name)(10, opts).fit(digits, FitContext(seed=3, progress=False, work_dir=work))
    assert m.history_["resumed_from_epoch"] == 1
    np.testing.assert_array_equal(m.labels_, ref.labels_)
    assert _comparable(m.history_) == _comparable(ref.history_)
    if hasattr(ref, "head_labels_"):
        np.testing.assert_array_equal(m.head_labels_, ref.head_labels_)


@pytest.mark.parametrize("name", list(CASES))
def test_a_run_killed_inside_an_epoch_resumes_there_to_identical_labels(name, digits, tmp_path, monkeypatch):
    """Issue 20: the mid-epoch checkpoint (every 10 minutes by default; here after every step) through
    each method's real batch iterator and step: killed at the 3rd step of epoch 1, resumed at that step."""
    opts = CASES[name]
    ref = get_method(name)(10, opts).fit(digits, FitContext(seed=3, progress=False, work_dir=tmp_path / "ref"))
    monkeypatch.setattr(loop_mod, "MID_EPOCH_CHECKPOINT_S", 0.0)
    work = tmp_path / "run"
    real_save = ckpt_mod.Checkpoint.save
    at: list[int] = []

    def save_then_die(self, payload):
        real_save(self, payload)
        if payload.get("partial") and payload["epoch"] == 1 and payload["partial"]["it"] == 2:
            at.append(payload["step"])
            raise Killed

    monkeypatch.setattr(ckpt_mod.Checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        get_method(name)(10, opts).fit(digits, FitContext(seed=3, progress=False, work_dir=work))
    monkeypatch.setattr(ckpt_mod.Checkpoint, "save", real_save)
    m = get_method(name)(10, opts).fit(digits, FitContext(seed=3, progress=False, work_dir=work))
    assert m.history_["resumed_from_epoch"] == 1 and m.history_["resumed_at_step"] == at[0]
    np.testing.assert_array_equal(m.labels_, ref.labels_)
    assert _comparable(m.history_) == _comparable(ref.history_)
    if hasattr(ref, "head_labels_"):
        np.testing.assert_array_equal(m.head_labels_, ref.head_labels_)


def test_checkpoint_is_keyed_by_options_and_can_be_switched_off(digits, tmp_path):
    get_method("temi")(10, TEMI).fit(digits, FitContext(seed=3, progress=False, work_dir=tmp_path))
    again = get_method("temi")(10, {**TEMI, "beta": 0.5}).fit(digits, FitContext(seed=3, progress=False,
                                                                                  work_dir=tmp_path))
    assert again.history_["resumed_from_epoch"] is None  # another option: another checkpoint
    assert len(list(tmp_path.glob("temi-ckpt-*.pt"))) == 2
    off = get_method("temi")(10, {**TEMI, "checkpoint": False}).fit(digits, FitContext(seed=3, progress=False,
                                                                                       work_dir=tmp_path))
    assert off.history_["checkpoint"] is None and len(list(tmp_path.glob("temi-ckpt-*.pt"))) == 2
