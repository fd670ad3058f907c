"""The feature cache never trusts a partial or corrupt entry; run directories never keep
half-written files; a saved model whose two files disagree is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgclust.backbones import build_backbone
from imgclust.data.base import ArraySource
from imgclust.features import cache_key, extract_features
from imgclust.rundir import atomic_open, clean_stale_tmp, write_csv


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return ArraySource((d.images * 255 / 16).astype(np.uint8), d.target, name="digits")


class Counting(ArraySource):
    def __init__(self, base, crash_at=None):
        super().__init__(base.images, base.labels, name=base.name)
        self.reads, self.crash_at = 0, crash_at

    def read(self, i):
        self.reads += 1
        if i == self.crash_at:
            raise KeyboardInterrupt
        return super().read(i)


BB = dict(name="pixels", image_size=8)


def _entry(tmp_path, src):
    return tmp_path / "features" / cache_key(src, build_backbone(**BB))


def test_finished_entry_records_size_and_sha256_and_is_verified(digits, tmp_path):
    bb = build_backbone(**BB)
    fs = extract_features(digits, bb, cache_dir=tmp_path, progress=False)
    meta = json.loads((_entry(tmp_path, digits) / "meta.json").read_text())
    data = (_entry(tmp_path, digits) / "features.npy").read_bytes()
    import hashlib

    assert meta["bytes"] == len(data) and meta["sha256"] == hashlib.sha256(data).hexdigest() == fs.sha256
    assert fs.cache_status == "fresh" and fs.rows_computed == len(digits)
    hit = extract_features(digits, bb, cache_dir=tmp_path, progress=False)
    assert hit.cache_status == "hit" and hit.rows_computed == 0


@pytest.mark.parametrize("verify", [None, True])
def test_bit_flip_in_a_finished_entry_is_detected_and_recomputed(digits, tmp_path, verify):
    bb = build_backbone(**BB)
    good = np.array(extract_features(digits, bb, cache_dir=tmp_path, progress=False).features)
    f = _entry(tmp_path, digits) / "features.npy"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # same size, same header: only the digest can tell
    f.write_bytes(bytes(raw))
    src = Counting(digits)
    fs = extract_features(src, bb, cache_dir=tmp_path, progress=False, verify_cache=verify)
    assert src.reads == len(digits) and fs.cache_status.startswith("recomputed")
    np.testing.assert_array_equal(fs.features, good)


def test_sampled_check_catches_truncation_and_a_flip_in_a_sampled_block(digits, tmp_path):
    bb = build_backbone(**BB)
    extract_features(digits, bb, cache_dir=tmp_path, progress=False)
    f = _entry(tmp_path, digits) / "features.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1  # the last block is always sampled
    f.write_bytes(bytes(raw))
    src = Counting(digits)
    assert extract_features(src, bb, cache_dir=tmp_path, progress=False, verify_cache=False).cache_status.startswith("recomputed")
    f.write_bytes(f.read_bytes()[:-4096])  # truncated
    src = Counting(digits)
    extract_features(src, bb, cache_dir=tmp_path, progress=False, verify_cache=False)
    assert src.reads == len(digits)


def test_resume_keeps_only_chunks_whose_rows_still_match(digits, tmp_path):
    bb = build_backbone(**BB)
    full = np.array(extract_features(digits, bb, use_cache=False, progress=False).features)
    with pytest.raises(KeyboardInterrupt):
        extract_features(Counting(digits, crash_at=1000), bb, cache_dir=tmp_path, progress=False, batch_size=50,
                         chunk_rows=200)
    entry = _entry(tmp_path, digits)
    prog = json.loads((entry / "progress.json").read_text())
    # Interrupted: the finished batches after the last chunk were flushed too.
    assert prog["done"] == 1000 and [c[:2] for c in prog["chunks"]][-1] == [800, 1000]
    # Corrupt a row of the third chunk (rows 400-599) behind the cache's back.
    mm = np.load(entry / "features.npy", mmap_mode="r+")
    mm[450] += 1.0
    mm.flush()
    del mm
    src = Counting(digits)
    fs = extract_features(src, bb, cache_dir=tmp_path, progress=False, batch_size=50, chunk_rows=200)
    assert fs.resumed_from == 400 and src.reads == len(digits) - 400  # chunks 0-399 kept, the rest redone
    np.testing.assert_array_equal(fs.features, full)


def test_partial_entry_without_chunk_digests_is_not_trusted(digits, tmp_path):
    bb = build_backbone(**BB)
    with pytest.raises(KeyboardInterrupt):
        extract_features(Counting(digits, crash_at=700), bb, cache_dir=tmp_path, progress=False, chunk_rows=128)
    p = _entry(tmp_path, digits) / "progress.json"
    prog = json.loads(p.read_text())
    del prog["chunks"]  # e.g. written by another version
    p.write_text(json.dumps(prog))
    src = Counting(digits)
    fs = extract_features(src, bb, cache_dir=tmp_path, progress=False)
    assert fs.resumed_from == 0 and src.reads == len(digits)


def test_stale_temp_files_are_removed_from_the_cache_entry(digits, tmp_path):
    bb = build_backbone(**BB)
    extract_features(digits, bb, cache_dir=tmp_path, progress=False)
    entry = _entry(tmp_path, digits)
    (entry / ".meta.json.abc123de.tmp").write_text("{")
    assert extract_features(digits, bb, cache_dir=tmp_path, progress=False).cache_status == "hit"
    assert list(entry.glob(".*.tmp")) == []


def test_atomic_write_leaves_the_old_file_or_the_new_one_never_a_mix(tmp_path):
    target = tmp_path / "assignments.csv"
    write_csv(target, ["id", "cluster"], [["a", 1]])
    before = target.read_bytes()

    def rows():
        yield ["b", 2]
        raise KeyboardInterrupt  # killed half-way through writing

    with pytest.raises(KeyboardInterrupt):
        write_csv(target, ["id", "cluster"], rows())
    assert target.read_bytes() == before
    assert list(tmp_path.glob(".*.tmp")) == []  # its temporary file is removed too
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "new.json") as f:
        f.write("{")
        raise RuntimeError
    assert not (tmp_path / "new.json").exists()


def test_clean_stale_tmp_only_touches_temp_files(tmp_path):
    (tmp_path / ".run.json.x1y2z3w4.tmp").write_text("")
    (tmp_path / "keep.tmp").write_text("")  # not hidden: not one of ours
    (tmp_path / ".hidden").write_text("")
    (tmp_path / ".notes.tmp").write_text("")  # hidden .tmp, but not atomic_open's name shape
    removed = clean_stale_tmp(tmp_path)
    assert [p.name for p in removed] == [".run.json.x1y2z3w4.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", ".notes.tmp", "keep.tmp"]
    assert clean_stale_tmp(tmp_path / "missing") == []


def test_two_processes_never_write_one_entry_at_once(digits, tmp_path):
    """The second extraction of the same data waits for the first and gets its cache hit."""
    import threading
    import time

    class Slow(Counting):
        def read(self, i):
            time.sleep(0.0005)
            return super().read(i)

    bb = build_backbone(**BB)
    first, second = Slow(digits), Counting(digits)
    results = {}
    t = threading.Thread(target=lambda: results.update(a=extract_features(first, bb, cache_dir=tmp_path, progress=False,
                                                                          workers=1)))
    t.start()
    while not (_entry(tmp_path, digits) / "progress.json").exists():
        time.sleep(0.005)
    results["b"] = extract_features(second, build_backbone(**BB), cache_dir=tmp_path, progress=False)
    t.join()
    assert results["a"].cache_status == "fresh" and first.reads == len(digits)
    assert results["b"].cache_status == "hit" and second.reads == 0


def test_run_directory_interrupted_while_writing_is_never_taken_for_complete(tmp_path, monkeypatch):
    """run.json is removed before outputs change and written last; every file is whole."""
    import imgclust.run as api  # the run-directory job (issue 17: moved from imgclust.api)
    from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig

    cfg = RunConfig(k=3, source=SourceConfig(path="digits", limit=300), backbone=BackboneConfig(name="pixels", image_size=8),
                    features=FeatureConfig(cache_dir=str(tmp_path / "c")), method_options={"n_init": 1})
    out = tmp_path / "run"
    api.cluster(cfg, out, progress=False)
    first = (out / "assignments.csv").read_bytes()
    (out / ".run.json.stale_01.tmp").write_text("{")
    real = api.write_csv

    def dying(path, header, rows):
        if path.name == "skipped.csv":
            raise KeyboardInterrupt  # killed between two outputs
        return real(path, header, rows)

    monkeypatch.setattr(api, "write_csv", dying)
    cfg.seed = 1
    with pytest.raises(KeyboardInterrupt):
        api.cluster(cfg, out, progress=False)
    assert not (out / "run.json").exists()  # incomplete: no run.json describing other files
    assert (out / "assignments.csv").read_bytes() != first  # the new file, complete
    assert list(out.rglob(".*.tmp")) == []
    monkeypatch.setattr(api, "write_csv", real)
    api.cluster(cfg, out, progress=False)
    assert json.loads((out / "run.json").read_text())["seed"] == 1
