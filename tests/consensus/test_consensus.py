"""Cluster ensembles: each consensus function recovers a labelling from noisy, relabelled copies."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from imgclust.consensus import METHODS, Ensemble, anmi, consensus, nmi_to_heads
from imgclust.consensus.cspa import cspa
from imgclust.consensus.hbgf import hbgf
from imgclust.consensus.hgpa import hgpa
from imgclust.consensus.mcla import mcla
from imgclust.errors import InputError


def noisy_heads(n: int, k: int, h: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced truth (n,) and h copies with a random share ``noise`` relabelled, each permuted."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % k)
    heads = np.stack([rng.permutation(k)[np.where(rng.random(n) < noise, rng.integers(0, k, n), y)]
                      for _ in range(h)])
    return y, heads


def test_membership_and_nmi_match_sklearn() -> None:
    y, heads = noisy_heads(500, 4, 6, 0.3)
    ens = Ensemble.from_labels(heads)
    b = ens.membership()
    assert b.shape == (500, 24) and (np.asarray(b.sum(1)).ravel() == 6).all()
    ref = [normalized_mutual_info_score(y, hl, average_method="geometric") for hl in heads]
    np.testing.assert_allclose(nmi_to_heads(ens, y), ref, atol=1e-9)
    assert anmi(ens, heads[0]) > anmi(ens, np.random.default_rng(1).integers(0, 4, 500))


@pytest.mark.parametrize("fn", [cspa, mcla, hbgf])
def test_each_graph_consensus_recovers_truth(fn) -> None:
    y, heads = noisy_heads(1500, 6, 20, 0.3)
    lab = fn(Ensemble.from_labels(heads), 6, seed=0)
    assert adjusted_rand_score(y, lab) > 0.97
    # Every single head is much worse than the consensus.
    assert max(adjusted_rand_score(y, hl) for hl in heads) < 0.6


def test_hgpa_exact_and_sampled() -> None:
    y, heads = noisy_heads(1200, 4, 10, 0.0)
    assert adjusted_rand_score(y, hgpa(Ensemble.from_labels(heads), 4, seed=0)) > 0.9
    # Partition a 400-object sample, extend to the rest through the hyperedges.
    assert adjusted_rand_score(y, hgpa(Ensemble.from_labels(heads), 4, seed=0, sample=400)) > 0.9


def test_consensus_picks_best_anmi_and_is_permutation_invariant() -> None:
    y, heads = noisy_heads(2000, 5, 12, 0.35, seed=3)
    res = consensus(heads, 5, seed=0)
    assert set(res.anmi) == set(METHODS) and res.method == max(res.anmi, key=res.anmi.get)
    assert adjusted_rand_score(y, res.labels) > 0.95
    # Renaming the clusters inside any head changes nothing.
    rng = np.random.default_rng(7)
    renamed = np.stack([rng.permutation(5)[hl] for hl in heads])
    res2 = consensus(renamed, 5, seed=0)
    assert res2.method == res.method and adjusted_rand_score(res.labels, res2.labels) == pytest.approx(1.0)
    # Same for the order of the heads' label values: labels 0..4 mapped to 10..50.
    assert adjusted_rand_score(res.labels, consensus(heads * 10 + 10, 5, seed=0).labels) == pytest.approx(1.0)


def test_cspa_skipped_above_its_size_limit() -> None:
    _, heads = noisy_heads(300, 3, 5, 0.1)
    res = consensus(heads, 3, seed=0, cspa_max_n=100)
    assert "cspa" in res.skipped and "cspa" not in res.anmi and res.method in ("hgpa", "mcla", "hbgf")


def test_consensus_errors() -> None:
    _, heads = noisy_heads(50, 3, 4, 0.1)
    with pytest.raises(InputError, match="unknown consensus"):
        consensus(heads, 3, methods=["vote"])
    with pytest.raises(InputError, match="at least 2"):
        consensus(heads, 1)
    with pytest.raises(InputError, match=">= 0"):
        consensus(heads - 1, 3)
    with pytest.raises(InputError, match="integers"):
        consensus(heads.astype(float), 3)
