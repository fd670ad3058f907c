"""Data-parallel SPICE-Self heads, self-training and batch-norm statistics (issue 20).

2 gloo ranks on 127.0.0.1 (started torchrun-style by tests/distributed.py) against 1 process
with the same global batches. Tolerance: the runs differ only in float summation order
(per-rank sums, then the all-reduce), which stays below 1e-4 in every weight over these runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch.distributed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/distributed.py, the rank launcher
from distributed import run_ranks  # noqa: E402


def _close(a: dict, b: dict, atol: float) -> None:
    for k, v in a.items():
        np.testing.assert_allclose(b[k], v, rtol=0, atol=atol, err_msg=k)


def test_spice_self_heads_two_processes_equal_one(tmp_path):
    args = {"config": {"heads": 3, "epochs": 2, "batch_size": 64, "hidden": 32, "checkpoint": False}}
    one = run_ranks("spice", args, tmp_path / "one.json", world=1)
    two = run_ranks("spice", args, tmp_path / "two.json", world=2)
    assert one["rows_per_step"] == [64] and two["rows_per_step"] == [32]  # each rank trains on half a batch
    _close(one["heads"], two["heads"], 1e-4)
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], atol=1e-4)
    np.testing.assert_allclose(two["head_losses"], one["head_losses"], atol=1e-4)
    assert two["best_head"] == one["best_head"]
    assert np.mean(np.asarray(two["labels"]) == np.asarray(one["labels"])) > 0.995
    assert len(set(one["labels"])) > 5


def test_batchnorm_heads_two_processes_equal_one(tmp_path):
    """ICCE's default input norm: BatchNorm1d statistics of the global batch on every rank."""
    args = {"method": "icce-heads", "config": {"heads": 4, "epochs": 3, "batch_size": 256, "norm": "batchnorm"}}
    one = run_ranks("heads", args, tmp_path / "one.json", world=1)
    two = run_ranks("heads", args, tmp_path / "two.json", world=2)
    _close(one["teacher"], two["teacher"], 1e-4)  # includes bn.weight/bias and the running statistics
    assert any("running_var" in k for k in one["teacher"])
    np.testing.assert_allclose(two["head_losses"], one["head_losses"], atol=1e-4)
    assert two["best_head"] == one["best_head"]
    assert np.mean(np.asarray(two["labels"]) == np.asarray(one["labels"])) > 0.995


def test_self_training_two_processes_equal_one(tmp_path):
    args = {"epochs": 3, "batch_size": 128}
    one = run_ranks("selftrain", args, tmp_path / "one.json", world=1)
    two = run_ranks("selftrain", args, tmp_path / "two.json", world=2)
    np.testing.assert_allclose(two["weight"], one["weight"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(two["bias"], one["bias"], rtol=0, atol=1e-4)
    assert two["lr"] == one["lr"]
    for a, b in zip(one["grid"], two["grid"]):
        assert b["holdout_acc"] == pytest.approx(a["holdout_acc"], abs=1e-3)
    assert np.mean(np.asarray(two["labels"]) == np.asarray(one["labels"])) > 0.995


def test_rank0_mines_neighbours_once_the_other_rank_reads_the_cache(tmp_path):
    args = {"work": str(tmp_path / "work"), "exact_max_rows": 500}  # the IVF path, as at scale
    two = run_ranks("neighbors", args, tmp_path / "two.json", world=2)
    assert two["cache"] == [1, 2]  # rank 0: written, rank 1: a cache hit
    one = run_ranks("neighbors", {**args, "work": str(tmp_path / "one")}, tmp_path / "one.json", world=1)
    assert two["indices"] == one["indices"] and two["recall"] == one["recall"]


def test_consensus_computed_once_on_rank0_and_broadcast(tmp_path):
    """ICCE's consensus under torchrun: rank 0 computes it, rank 1 receives labels and summary."""
    two = run_ranks("consensus", {}, tmp_path / "two.json", world=2)
    one = run_ranks("consensus", {}, tmp_path / "one.json", world=1)
    assert one["runs"] == [1] and two["runs"] == [1, 0]  # rank 1 never ran it
    assert two["ranks_agree"] and two["labels"] == one["labels"] and two["summary"]["method"] == one["summary"]["method"]
    assert two["summary"]["anmi"] == one["summary"]["anmi"] and one["summary"]["anmi"][one["summary"]["method"]] > 0.5
    assert two["candidates"] == ["hbgf", "mcla"]  # rank 0 keeps its candidates


def test_head_labels_sharded_over_ranks(tmp_path):
    """TEMI/ICCE's labels of every row under every head: each rank labels its share (501 + 500 of 1,001
    rows), every rank ends with all of them, equal to one process's labels."""
    two = run_ranks("head_labels", {}, tmp_path / "two.json", world=2)
    one = run_ranks("head_labels", {}, tmp_path / "one.json", world=1)
    assert one["rows"] == [1001] and two["rows"] == [500, 501]
    assert two["equal_whole"] and two["ranks_agree"] and one["equal_whole"]
    assert two["dtype"] == "int16" and two["shape"] == [5, 1001] and two["distinct"] == 7
