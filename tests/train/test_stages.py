"""train/stages.py: per-stage seeds, checkpoints and evaluation of multi-stage recipes (PICI, CC)."""

import numpy as np
from sklearn.datasets import load_digits

from imgclust.train.stages import derive_seed, evaluate_stage, stage_checkpoint


def test_derive_seed_is_a_stable_function_of_the_parts():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, s, e) for s in range(3) for e in range(50)}) == 150
    assert 0 <= derive_seed(7) < 2**56


def test_stage_checkpoint_keys_follow_earlier_stages_not_the_stage_own_epochs(tmp_path):
    opts = {"lr": 1e-3}
    a = stage_checkpoint(tmp_path, "pici", [("pretrain", 2), ("train", 5)], 1, k=10, seed=0, opts=opts, data="d")
    b = stage_checkpoint(tmp_path, "pici", [("pretrain", 2), ("train", 9)], 1, k=10, seed=0, opts=opts, data="d")
    c = stage_checkpoint(tmp_path, "pici", [("pretrain", 3), ("train", 5)], 1, k=10, seed=0, opts=opts, data="d")
    assert a.path == b.path != c.path
    assert a.path.name.startswith("pici-train-ckpt-") and a.path.parent == tmp_path
    assert stage_checkpoint(None, "pici", [("train", 5)], 0, k=10, seed=0, opts=opts, data="d") is None


def test_evaluate_stage_scores_only_with_truth():
    x, y = load_digits(return_X_y=True)
    x = x[:300].astype(np.float32)
    proba = np.eye(10, dtype=np.float32)[y[:300]]
    labels, rec = evaluate_stage(x, proba, 10, seed=0, truth=y[:300])
    assert set(labels) == {"kmeans", "head"} and rec["head_clusters_used"] == 10
    assert rec["metrics"]["head"]["acc"] == 1.0 and 0.5 < rec["metrics"]["kmeans"]["acc"] < 1.0
    labels, rec = evaluate_stage(x, None, 10, seed=0)
    assert set(labels) == {"kmeans"} and rec == {}
