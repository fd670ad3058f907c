"""Issue 20: the training data's digest (checkpoint keys of TEMI/ICCE, SPICE, ... ) is hashed in row
blocks: the digest of a memory-mapped feature file is the one of hashing all its bytes at once (so
existing checkpoints still resume), without a copy of the file in anonymous memory."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from imgclust.train.checkpoint import data_digest


def _whole(*arrays) -> str:
    """The digest as computed before issue 20 (``tobytes()`` of each array)."""
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def test_digest_equals_whole_bytes_for_every_kind_of_array():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 7)).astype(np.float32)
    cases = [(x,), (x[::3],), (x.T,), (np.float64(2.5),), (np.zeros((0, 4)),), (np.arange(10, dtype=np.int64),),
             (torch.arange(6.0).reshape(2, 3), x[:5], np.array([1, 2], np.int64)), (rng.random((3, 4, 5)),)]
    for arrays in cases:
        assert data_digest(*arrays) == _whole(*arrays)
    assert data_digest(x) != data_digest(x[:-1]) and data_digest(x) != data_digest(x.astype(np.float64))


def test_memmap_digest_without_a_copy_in_memory(tmp_path, anon_growth_mb):
    """200k x 384 float32 (293 MB) memory-mapped: anonymous memory grows by < 100 MB (``tobytes()``, as
    before issue 20, grew it by the whole array)."""
    n, d = 200_000, 384
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, 50_000):
        x[s:s + 50_000] = np.float32(s / n)
    x[123, 45] = 7.0
    x.flush()
    del x
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    got, grew = anon_growth_mb(lambda: data_digest(mm))
    assert grew < 100
    assert got == _whole(np.load(tmp_path / "x.npy"))
