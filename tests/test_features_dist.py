"""Sharded extraction under a torchrun-style launch: 2 gloo ranks on 127.0.0.1, real digits, EfficientNet-Lite0."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest

from distributed import run_ranks, start_ranks

pytest.importorskip("torch.distributed")


def _entry_files(path):
    from pathlib import Path

    return sorted(p.name for p in Path(path).iterdir())


def test_two_ranks_write_the_single_process_cache_byte_for_byte(tmp_path):
    one = run_ranks("extract", {"cache": str(tmp_path / "one")}, tmp_path / "one.json", world=1)
    two = run_ranks("extract", {"cache": str(tmp_path / "two")}, tmp_path / "two.json", world=2)
    assert two["sha256"] == one["sha256"]
    a = (tmp_path / "one").joinpath(*one["path"].split("/one/")[1].split("/")) / "features.npy"
    b = (tmp_path / "two").joinpath(*two["path"].split("/two/")[1].split("/")) / "features.npy"
    assert a.read_bytes() == b.read_bytes()
    assert np.load(b).std() > 0  # real features, not a zero file
    m1, m2 = (json.loads((p.parent / "meta.json").read_text()) for p in (a, b))
    assert (m1["key"], m1["n"], m1["sha256"], m1["n_valid"]) == (m2["key"], m2["n"], m2["sha256"], m2["n_valid"])
    assert m2["processes"] == 2
    assert "shard-0-of-2.json" not in _entry_files(b.parent)
    # Each rank ran its half only: rank 0's count is the global one (all-reduced).
    assert two["rows_computed"] == 1797
    # The finished entry is a plain cache hit for a single process.
    again = run_ranks("extract", {"cache": str(tmp_path / "two")}, tmp_path / "again.json", world=1)
    assert again["status"] == "hit" and again["rows_computed"] == 0


def test_a_killed_rank_resumes_after_its_last_chunk(tmp_path):
    cache = str(tmp_path / "c")
    # Rank 1 owns rows 896..1796; it dies (os._exit, like SIGKILL) while reading row 1500.
    procs = start_ranks("extract", {"cache": cache, "crash_rank": 1, "crash_at": 1500}, tmp_path / "x.json", 2)
    assert procs[1].wait(timeout=120) == 9
    time.sleep(0.5)
    procs[0].kill()  # rank 0 waits in the barrier for ever; torchrun would stop it the same way
    procs[0].wait()
    for p in procs:
        p.stdout.close()
    shard = json.loads(next((tmp_path / "c").rglob("shard-1-of-2.json")).read_text())
    assert shard["lo"] == 896 and 896 < shard["done"] < 1500
    res = run_ranks("extract", {"cache": cache}, tmp_path / "r.json", world=2)
    assert res["resumed_from"] >= shard["done"] - 896 > 0
    assert res["rows_computed"] == 1797 - res["resumed_from"]
    one = run_ranks("extract", {"cache": str(tmp_path / "one")}, tmp_path / "one.json", world=1)
    assert res["sha256"] == one["sha256"]
    assert subprocess  # (imported for the Popen handles above)
