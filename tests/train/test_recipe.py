"""train/recipe.py: a method's epochs in the shared loop with its per-fit checkpoint, and the
cluster-size record; checkpoint keys equal the ones the methods built by hand (old runs resume)."""

from types import SimpleNamespace

import numpy as np
import torch

from imgclust.train.checkpoint import Checkpoint, data_digest
from imgclust.train.recipe import cluster_sizes, run_epochs


class _Cfg(SimpleNamespace):
    def to_dict(self):
        return {"epochs": self.epochs, "lr": self.lr, "checkpoint": self.checkpoint}


def _fit(work_dir, epochs=3, checkpoint=True, seed=0):
    """A linear least-squares fit on fixed data, as a method would run it."""
    method = SimpleNamespace(name="toy", n_clusters=2, config=_Cfg(epochs=epochs, lr=0.1, checkpoint=checkpoint))
    ctx = SimpleNamespace(work_dir=work_dir, seed=seed, progress=False)
    x = np.linspace(-1, 1, 40, dtype=np.float32).reshape(20, 2)
    y = torch.from_numpy(x @ np.array([2.0, -1.0], np.float32))
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"seen": 0}

    def batches(epoch):
        perm = torch.randperm(20, generator=gen)
        return (perm[i:i + 5] for i in range(0, 20, 5))

    def step(rows, info):
        state["seen"] += len(rows)
        return ((model(torch.from_numpy(x)[rows]).squeeze(1) - y[rows]) ** 2).mean()

    res, run = run_epochs(method, ctx, x, model, step, batches, optimizer=opt, generator=gen, state=state,
                          extra="part")
    return model, res, run, state, x


def test_run_epochs_trains_checkpoints_and_resumes(tmp_path):
    model, res, run, state, x = _fit(tmp_path)
    assert len(res.history["loss"]) == 3 and res.history["loss"][-1] < res.history["loss"][0]
    assert state["seen"] == 60 and run["resumed_from_epoch"] is None and len(run["epoch_s"]) == 3
    # the key is the one the methods built by hand: name, K, seed, options, data digest, extra parts
    hand = Checkpoint.in_dir(tmp_path, "toy", k=2, seed=0, opts={"epochs": 3, "lr": 0.1, "checkpoint": True},
                             data=data_digest(x), extra="part")
    assert run["checkpoint"] == str(hand.path) and hand.path.exists()
    again, res2, run2, state2, _ = _fit(tmp_path)  # a re-run finds the finished checkpoint
    assert run2["resumed_from_epoch"] == 3 and state2["seen"] == 60
    assert torch.equal(again.weight, model.weight)


def test_run_epochs_without_work_dir_or_with_checkpoint_off_writes_nothing(tmp_path):
    _, _, run, _, _ = _fit(None)
    assert run["checkpoint"] is None
    _, _, run, _, _ = _fit(tmp_path, checkpoint=False)
    assert run["checkpoint"] is None and not list(tmp_path.iterdir())


def test_cluster_sizes():
    assert cluster_sizes(np.array([0, 0, 2]), 4) == {"cluster_sizes": [2, 0, 1, 0], "empty_clusters": [1, 3]}
    assert cluster_sizes(np.array([], dtype=np.int64), 2) == {"cluster_sizes": [0, 0], "empty_clusters": [0, 1]}
