"""Issue 20: TEMI's and ICCE's ``predict`` go through ``predict_proba`` in row blocks, never the (N, K)
probabilities of every row at once (4 GB at 10M x K = 100), and return the labels of the whole call
bit for bit (blocks aligned with the 65,536-row blocks the heads and the classifier compute in)."""

from __future__ import annotations

import numpy as np
import pytest

from imgclust.heads.wrap import argmax_blocks
from imgclust.methods import FitContext, get_method

FAST = {"heads": 4, "epochs": 3, "batch_size": 128, "k": 10, "warmup_epochs": 1, "momentum": 0.9,
        "center_neighbors": True, "st_epochs": 3, "st_lrs": [0.01], "st_weight_decays": [0.0]}


@pytest.mark.parametrize("name,opts", [("icce", FAST), ("icce", {**FAST, "self_train": False}), ("temi", FAST)])
def test_predict_in_blocks_equals_whole_argmax(digits_xy, name, opts):
    x, _ = digits_xy
    opts = {k: v for k, v in opts.items() if name == "icce" or not k.startswith("st_")}
    m = get_method(name)(10, opts).fit(x, FitContext(seed=0, progress=False))
    rng = np.random.default_rng(0)
    big = x[rng.integers(0, len(x), 140_000)] + rng.normal(0, 0.5, (140_000, x.shape[1])).astype(np.float32)
    whole = m.predict_proba(big).argmax(1)
    seen: list[int] = []
    inner = m.predict_proba

    def recording(f):
        seen.append(len(f))
        return inner(f)

    m.predict_proba = recording
    got = m.predict(big)
    assert seen == [65_536, 65_536, 140_000 - 2 * 65_536]  # main's predict: one call of 140,000 rows
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, whole)
    assert len(np.unique(got)) > 3  # a real clustering, not a constant


def test_argmax_blocks_small_chunks_and_empty():
    rng = np.random.default_rng(1)
    p = rng.random((1000, 7)).astype(np.float32)
    np.testing.assert_array_equal(argmax_blocks(lambda a: a, p, chunk=64), p.argmax(1))
    assert argmax_blocks(lambda a: a, p[:0]).shape == (0,)


def test_fit_labels_blocks_equal_one_call(digits_xy):
    """The estimator's labels and confidences of the fitted rows (``fit_labels``): above ``block`` rows,
    ``fit_proba`` block by block — same argmax, max within float rounding (k-means' distances of a row
    differ in the last bits with the block's size: 19 of 1,797 confidences by ~3e-7); up to it, one call,
    bit for bit."""
    from imgclust.methods.base import fit_labels

    x, _ = digits_xy
    m = get_method("kmeans")(10, {"n_init": 1}).fit(x, FitContext(seed=0, progress=False))
    proba = m.fit_proba(x)
    seen: list[int] = []
    inner = m.fit_proba
    m.fit_proba = lambda f: seen.append(len(f)) or inner(f)
    lab, conf = fit_labels(m, x, block=500)
    assert seen == [500, 500, 500, 297]
    np.testing.assert_array_equal(lab, proba.argmax(1))
    np.testing.assert_allclose(conf, proba.max(1), rtol=1e-5)
    assert lab.dtype == np.int64 and conf.dtype == np.float32
    seen.clear()
    lab1, conf1 = fit_labels(m, x)
    assert seen == [len(x)]
    np.testing.assert_array_equal(lab1, proba.argmax(1))
    np.testing.assert_array_equal(conf1, proba.max(1))


# icce: heads, consensus and self-training (refine/selftrain.py), all on the memmap
MEMMAP_OPTS = {"temi": {"heads": 4}, "spice": {},
               "icce": {"heads": 4, "st_epochs": 2, "st_lrs": [0.01], "st_weight_decays": [0.0]}}


@pytest.mark.parametrize("name", sorted(MEMMAP_OPTS))
def test_fit_on_the_read_only_memmap_warns_nothing_and_equals_the_array(digits_xy, tmp_path, name):
    """The streaming path hands the methods the read-only memory-mapped cache itself: no copy, no
    torch "not writable" warning on the user's console, and the same labels as an in-memory array."""
    import warnings

    x, _ = digits_xy
    np.save(tmp_path / "f.npy", np.ascontiguousarray(x, dtype=np.float32))
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert not mm.flags.writeable
    opts = {"epochs": 2, "batch_size": 128, **MEMMAP_OPTS[name]}
    fit = lambda f: get_method(name)(10, opts).fit(f, FitContext(seed=0, progress=False)).labels_  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fit(mm)
    assert not [w for w in caught if "not writable" in str(w.message)]
    np.testing.assert_array_equal(got, fit(np.array(x, dtype=np.float32)))
    assert len(np.unique(got)) > 1
