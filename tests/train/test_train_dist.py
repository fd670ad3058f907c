"""Data-parallel heads (issue 20): 2 gloo ranks on 127.0.0.1 against 1 process, same global batch."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import run_ranks

pytest.importorskip("torch.distributed")


def test_gathered_prior_sinkhorn_and_gradient_equal_one_process_on_the_global_batch(tmp_path):
    args = {"global_batch": 64, "k": 7}
    one = run_ranks("prior", args, tmp_path / "one.json", world=1)
    two = run_ranks("prior", args, tmp_path / "two.json", world=2)
    np.testing.assert_allclose(two["prior"], one["prior"], rtol=0, atol=1e-6)
    # The student gradient depends on the SK-centred teacher of the whole batch: equal too.
    np.testing.assert_allclose(two["grad"], one["grad"], rtol=1e-5, atol=1e-8)
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
    # Not trivially equal: the prior moved away from its start by the batch statistics.
    assert np.abs(np.asarray(one["grad"])).max() > 1e-4


# Tolerance: the two runs differ only in float summation order (gradients summed per rank, then
# averaged); over 3 epochs x 7 steps of AdamW that stays below 1e-4 in every teacher weight.
@pytest.mark.parametrize("method,config", [
    ("temi", {"heads": 4, "epochs": 3, "batch_size": 256, "norm": "l2"}),
    ("icce-heads", {"heads": 4, "epochs": 3, "batch_size": 256, "norm": "l2"}),  # SK + CE + adaptive sets
])
def test_two_process_heads_equal_one_process_heads(tmp_path, method, config):
    args = {"method": method, "config": config}
    one = run_ranks("heads", args, tmp_path / "one.json", world=1)
    two = run_ranks("heads", args, tmp_path / "two.json", world=2)
    for k, v in one["teacher"].items():
        np.testing.assert_allclose(two["teacher"][k], v, rtol=0, atol=1e-4, err_msg=k)
    np.testing.assert_allclose(two["prior"], one["prior"], atol=1e-5)
    np.testing.assert_allclose(two["head_losses"], one["head_losses"], atol=1e-4)
    assert two["best_head"] == one["best_head"]
    agree = np.mean(np.asarray(two["labels"]) == np.asarray(one["labels"]))
    assert agree > 0.995
    assert len(set(one["labels"])) > 5  # the heads learnt clusters, not one blob


def test_a_gpu_machine_gets_nccl_for_cuda_tensors_and_gloo_for_cpu_ones(monkeypatch):
    """NCCL alone refuses CPU tensors (the extraction's start flag, CPU-second totals, --device cpu runs):
    on a GPU machine the group is created with both backends, each for its device."""
    import torch
    import torch.distributed as d

    from imgclust.train import dist

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(d, "is_initialized", lambda: False)
    monkeypatch.setattr(d, "init_process_group", lambda backend, **kw: seen.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist.init_from_env()
    assert seen["backend"] == "cpu:gloo,cuda:nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.backend() == "gloo"
