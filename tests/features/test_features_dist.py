"""Sharded extraction under a torchrun-style launch: 2 gloo ranks on 127.0.0.1, 512 real digits through
EfficientNet-Lite0 (batch 64, so 4 batches per rank; a chunk is flushed after every batch)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import run_ranks, start_ranks

pytest.importorskip("torch.distributed")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    res = run_ranks("extract", {"cache": str(d / "cache")}, d / "out.json", world=1)
    return res, Path(res["path"])


def test_two_ranks_write_the_single_process_cache_byte_for_byte(single, tmp_path):
    one, one_entry = single
    two = run_ranks("extract", {"cache": str(tmp_path / "two")}, tmp_path / "two.json", world=2)
    two_entry = Path(two["path"])
    assert two_entry.name == one_entry.name  # same cache key
    assert two["sha256"] == one["sha256"]
    a, b = one_entry / "features.npy", two_entry / "features.npy"
    assert a.read_bytes() == b.read_bytes()
    assert np.load(b).std() > 0  # real features, not a zero file
    m1, m2 = (json.loads((p.parent / "meta.json").read_text()) for p in (a, b))
    assert (m1["key"], m1["n"], m1["sha256"], m1["n_valid"]) == (m2["key"], m2["n"], m2["sha256"], m2["n_valid"])
    assert m2["processes"] == 2
    assert not list(two_entry.glob("shard-*.json"))  # merged into progress.json
    assert two["rows_computed"] == 512  # summed over ranks: each row once
    # The finished entry is a plain cache hit for a single process.
    from _dist_worker import _digits

    from imgclust.backbones import build_backbone
    from imgclust.features import extract_features

    fs = extract_features(_digits(), build_backbone("efficientnet-lite0", image_size=32), cache_dir=tmp_path / "two",
                          progress=False, engine="torch")
    assert fs.cache_status == "hit" and fs.sha256 == one["sha256"]


def test_a_killed_rank_resumes_after_its_last_chunk(single, tmp_path):
    one, _ = single
    cache = str(tmp_path / "c")
    # Rank 1 owns rows 256..511; it dies (os._exit(9), like SIGKILL) after flushing 2 chunks of 64 rows.
    procs = start_ranks("extract", {"cache": cache, "crash_rank": 1, "crash_after_chunks": 2}, tmp_path / "x.json", 2)
    try:
        assert procs[1].wait(timeout=600) == 9
        time.sleep(0.5)
    finally:
        procs[0].kill()  # rank 0 waits in the barrier; torchrun stops the survivors the same way
        for p in procs:
            p.wait()
            p.stdout.close()
    shard = json.loads(next((tmp_path / "c").rglob("shard-1-of-2.json")).read_text())
    assert (shard["lo"], shard["done"]) == (256, 384)
    shard0 = json.loads(next((tmp_path / "c").rglob("shard-0-of-2.json")).read_text())  # killed too, maybe mid-shard
    res = run_ranks("extract", {"cache": cache}, tmp_path / "r.json", world=2)
    # Rank 0's finished shard and rank 1's flushed chunks are kept; only the rest is recomputed.
    assert res["resumed_from"] == shard0["done"] + 128
    assert res["rows_computed"] == 512 - res["resumed_from"]
    assert res["status"] == "resumed"
    assert res["sha256"] == one["sha256"]
