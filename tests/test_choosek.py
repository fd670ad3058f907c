"""Choosing K without labels (imgclust.choosek), ``cluster --k auto`` and ``imgclust choose-k``."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from imgclust.choosek import choose_k, format_curve, laplacian_spectrum, parse_k_range, prepare_features
from imgclust.errors import InputError


def cli(*args, tmp_path):
    env = dict(os.environ, IMGCLUST_CACHE=str(tmp_path / "cache"), IMGCLUST_QUIET="1", OMP_NUM_THREADS="1",
               IMGCLUST_REPORT_MAP="pca")
    return subprocess.run([sys.executable, "-m", "imgclust.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("spec, want", [("2:6", [2, 3, 4, 5, 6]), ("2:10:4", [2, 6, 10]), ("10, 5,5", [5, 10]),
                                        ([3, 2], [2, 3])])
def test_parse_k_range(spec, want):
    assert parse_k_range(spec) == want


@pytest.mark.parametrize("spec", ["1:5", "5", "a:b", "2:9:0", "2:3:4:5", ""])
def test_parse_k_range_rejects(spec):
    with pytest.raises(InputError):
        parse_k_range(spec)


@pytest.mark.parametrize("true_k", [3, 5, 8])
def test_picks_the_number_of_well_separated_blobs(true_k):
    x, y = make_blobs(n_samples=120 * true_k, centers=true_k, n_features=24, cluster_std=1.0, center_box=(-12, 12),
                      random_state=true_k)
    r = choose_k(x, "2:12", progress=False, labels=y)
    assert r["k"] == true_k, format_curve(r)
    row = {c["k"]: c for c in r["curve"]}[true_k]
    # the labels only add check columns: at the true K the partition is the classes
    assert row["acc"] > 0.99 and row["majority_acc"] > 0.99
    # over-clustering: majority-vote accuracy cannot drop when K grows past the classes
    assert all(c["majority_acc"] >= c["acc"] - 1e-12 for c in r["curve"])


def test_no_structure_gives_no_confident_pick():
    """Isotropic noise: silhouettes stay low at every K (nothing to find)."""
    x = np.random.default_rng(0).standard_normal((600, 16))
    r = choose_k(x, "2:8", progress=False)
    assert max(c["silhouette"] for c in r["curve"]) < 0.2


def test_deterministic_under_a_seed():
    x, _ = make_blobs(n_samples=400, centers=4, n_features=8, random_state=0)
    a = choose_k(x, "2:6", progress=False, seed=3)
    b = choose_k(x, "2:6", progress=False, seed=3)
    assert a["curve"] == b["curve"] and a["k"] == b["k"]


def test_laplacian_spectrum_counts_disconnected_groups():
    """Seven far-apart groups: exactly seven zero eigenvalues, then a jump (Lanczos alone loses
    copies of a repeated eigenvalue; the components are solved one by one)."""
    x, _ = make_blobs(n_samples=700, centers=7, n_features=16, cluster_std=0.5, center_box=(-50, 50), random_state=1)
    _, z = prepare_features(x, pca_dim=16)
    lam = laplacian_spectrum(z, 10, n_neighbors=8)
    assert np.all(np.diff(lam) >= -1e-9)
    assert np.sum(lam < 1e-6) == 7 and lam[7] > 1e-3


def test_rejects_bad_input():
    x = np.random.default_rng(0).standard_normal((30, 4))
    with pytest.raises(InputError, match="below the number"):
        choose_k(x, "2:40", progress=False)
    with pytest.raises(InputError, match="2-D"):
        choose_k(x[0], "2:4", progress=False)


def test_cluster_k_auto_on_digits_records_the_choice(tmp_path):
    out = tmp_path / "run"
    r = cli("cluster", "digits", "--k", "auto", "--k-range", "6:12", "--backbone", "pixels", "--image-size", 8,
            "--out", out, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    ck = json.loads((out / "choose_k.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["k"] == "auto"  # re-running the recorded config chooses again
    assert run["k_selection"]["k"] == ck["k"] and len(run["cluster_sizes"]) == ck["k"]
    assert 6 <= ck["k"] <= 12 and [c["k"] for c in ck["curve"]] == list(range(6, 13))
    assert f"K chosen automatically: {ck['k']}" in r.stdout
    assert "Choice of K" in (out / "report.html").read_text(encoding="utf-8")
    # a later fixed-K run in the same directory (--overwrite: it holds a finished run) drops the old curve
    r = cli("cluster", "digits", "--k", 4, "--backbone", "pixels", "--image-size", 8, "--out", out, "--no-report",
            "--overwrite", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (out / "choose_k.json").exists() and not (out / "report.html").exists()


def test_choose_k_command(tmp_path):
    r = cli("choose-k", "digits", "--backbone", "pixels", "--image-size", 8, "--k-range", "8:11", "--runs", 3,
            "--out", tmp_path / "ck.json", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| K | silhouette" in r.stdout and "picked K =" in r.stdout
    res = json.loads((tmp_path / "ck.json").read_text())
    assert res["candidates"] == [8, 9, 10, 11] and "majority_acc" in res["curve"][0]  # digits has labels
    bad = cli("choose-k", "digits", "--backbone", "pixels", "--k-range", "1:4", tmp_path=tmp_path)
    assert bad.returncode == 2 and "K in the range must be >= 2" in bad.stderr
    bad = cli("cluster", "digits", "--k", "many", "--backbone", "pixels", tmp_path=tmp_path)
    assert bad.returncode == 2 and "'auto'" in bad.stderr
