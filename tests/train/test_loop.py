"""The shared training loop: a killed run resumes bit-identically; torn/foreign checkpoints are
ignored; the non-finite check names the option; the no-decay rule and the schedules' values."""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from imgclust.nonfinite import NonFiniteLoss
from imgclust.train.checkpoint import Checkpoint
from imgclust.train.loop import LoopSpec, epoch_permutation, run_loop
from imgclust.train.optim import build_optimizer, ema_update_, param_groups, schedule

N, D, K, BS, EPOCHS = 64, 6, 3, 16, 4


class Killed(RuntimeError):
    pass


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.LayerNorm(8), nn.Dropout(0.3), nn.Linear(8, K))


def _train(ckpt: Checkpoint | None, kill_at: tuple[int, int] | None = None, by_perm: bool = False,
           every_s: float | None = None):
    """Uses every RNG the loop must restore: a batch generator, torch's global one (dropout)
    and numpy's global one (label noise), plus a carried state tensor and an EMA teacher."""
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = _net()
    teacher = copy.deepcopy(model).requires_grad_(False)
    gen = torch.Generator().manual_seed(7)
    np.random.seed(3)
    opt = build_optimizer("adamw", model, lr=0.05, weight_decay=0.01)
    state = {"ema_loss": torch.zeros(())}

    def batches(epoch):
        perm = epoch_permutation(N, 5, epoch) if by_perm else torch.randperm(N, generator=gen)
        return (perm[i:i + BS] for i in range(0, N, BS))

    def step(rows, info):
        if kill_at == (info.epoch, info.it):
            if os.environ.get("TOY_SIGKILL") == "1":
                os.kill(os.getpid(), signal.SIGKILL)
            raise Killed
        noise = torch.from_numpy(np.random.randn(len(rows), K).astype(np.float32)) * 0.1
        logits = model(x[rows]) + noise
        ce = nn.functional.cross_entropy(logits, y[rows])
        state["ema_loss"] = 0.9 * state["ema_loss"] + 0.1 * ce.detach()
        return ce, {"ce": ce, "ema": state["ema_loss"]}

    spec = LoopSpec(epochs=EPOCHS, name="toy", lr=schedule("warmup-cosine", 0.05, EPOCHS * 4, warmup=3),
                    clip_grad_norm=1.0, progress=False, checkpoint_every_s=every_s)
    res = run_loop(model, step, batches, spec, optimizer=opt,
                   after_step=[lambda info: ema_update_(teacher, model, 0.9)],
                   on_epoch_end=lambda e, means, info: {"w_norm": float(model[0].weight.detach().norm())},
                   modules={"teacher": teacher}, generators=[gen], state=state, checkpoint=ckpt)
    return model, teacher, res, state


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("by_perm", [False, True])
def test_killed_run_resumes_bit_identical(tmp_path, by_perm):
    ref_model, ref_teacher, ref, ref_state = _train(Checkpoint.in_dir(tmp_path / "a", "toy", seed=0), by_perm=by_perm)
    assert ref.resumed_from is None and ref.steps == EPOCHS * N // BS
    assert len(ref.history["loss"]) == EPOCHS and set(ref.history) == {"loss", "ce", "ema", "w_norm"}
    ckpt = Checkpoint.in_dir(tmp_path / "b", "toy", seed=0)
    with pytest.raises(Killed):
        _train(ckpt, kill_at=(2, 1), by_perm=by_perm)  # dies inside epoch 2: epochs 0, 1 are saved
    model, teacher, res, state = _train(ckpt, by_perm=by_perm)
    assert res.resumed_from == 2 and res.steps == ref.steps
    assert _same(model, ref_model) and _same(teacher, ref_teacher)
    assert res.history == ref.history
    assert torch.equal(state["ema_loss"], ref_state["ema_loss"])
    # a run resumed from a finished checkpoint trains nothing and returns the same
    model2, _, res2, _ = _train(ckpt, by_perm=by_perm)
    assert res2.resumed_from == EPOCHS and _same(model2, ref_model) and res2.history == ref.history


@pytest.mark.parametrize("by_perm", [False, True])
def test_a_run_killed_inside_an_epoch_resumes_from_its_mid_epoch_checkpoint_bit_identical(tmp_path, by_perm):
    """Issue 20: one epoch can last hours (50 heads on 10M rows), so the loop also checkpoints inside an
    epoch (every ``checkpoint_every_s``; 0 here: after every step). Killed at the 3rd step of epoch 2,
    the re-run starts at that step, not at the epoch's start, and still ends bit-identical: the batch
    order comes back from the start-of-epoch RNG states, the in-step draws from the saved ones."""
    ref_model, ref_teacher, ref, ref_state = _train(None, by_perm=by_perm)
    ckpt = Checkpoint.in_dir(tmp_path, "toy", seed=0)
    with pytest.raises(Killed):
        _train(ckpt, kill_at=(2, 2), by_perm=by_perm, every_s=0)
    saved = ckpt.load()
    assert saved["epoch"] == 2 and saved["partial"]["it"] == 2 and saved["step"] == 2 * N // BS + 2
    model, teacher, res, state = _train(ckpt, by_perm=by_perm, every_s=0)
    assert res.resumed_from == 2 and res.resumed_at_step == 2 * N // BS + 2 and res.steps == ref.steps
    assert _same(model, ref_model) and _same(teacher, ref_teacher)
    assert res.history == ref.history and torch.equal(state["ema_loss"], ref_state["ema_loss"])
    # control: with the default period (10 minutes) the same kill leaves only the epoch-level checkpoint
    ckpt2 = Checkpoint.in_dir(tmp_path / "default", "toy", seed=0)
    with pytest.raises(Killed):
        _train(ckpt2, kill_at=(2, 2), by_perm=by_perm)
    assert "partial" not in ckpt2.load() and ckpt2.load()["step"] == 2 * N // BS


def test_sigkilled_process_resumes_bit_identical(tmp_path):
    """The real thing: a child process trains, is SIGKILLed inside epoch 2, this process resumes."""
    ref_model, _, ref, _ = _train(None)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_loop import _train, Checkpoint; "
            "_train(Checkpoint.in_dir(sys.argv[2], 'toy', seed=0), kill_at=(2, 1))")
    env = {**os.environ, "TOY_SIGKILL": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)], env=env,
                       capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    model, _, res, _ = _train(Checkpoint.in_dir(tmp_path, "toy", seed=0))
    assert res.resumed_from == 2 and _same(model, ref_model) and res.history == ref.history


def test_resume_matters(tmp_path):
    """Controls: the run is deterministic with a seed, and the checkpoint left by a run killed in
    epoch 2 holds the state after 2 epochs (not the final one), so the resume tests compare a real
    continuation."""
    ref_model, _, ref, _ = _train(None)
    model, _, res, _ = _train(None)
    assert _same(model, ref_model)  # deterministic with a seed
    ckpt = Checkpoint.in_dir(tmp_path, "toy", seed=0)
    with pytest.raises(Killed):
        _train(ckpt, kill_at=(2, 0))
    saved = ckpt.load()
    assert saved is not None and saved["epoch"] == 2 and saved["step"] == 2 * N // BS
    assert not torch.equal(saved["modules"]["model"]["0.weight"], ref_model.state_dict()["0.weight"])


def test_torn_and_foreign_checkpoints_are_ignored(tmp_path, caplog):
    ref_model, _, ref, _ = _train(None)
    ckpt = Checkpoint.in_dir(tmp_path, "toy", seed=0)
    ckpt.path.parent.mkdir(parents=True, exist_ok=True)
    full = Checkpoint.in_dir(tmp_path / "full", "toy", seed=0)
    _train(full)
    data = full.path.read_bytes()
    ckpt.path.write_bytes(data[: len(data) // 2])  # torn
    with caplog.at_level(logging.WARNING, logger="imgclust.train"):
        model, _, res, _ = _train(ckpt)
    assert res.resumed_from is None and _same(model, ref_model) and res.history == ref.history
    assert "unreadable" in caplog.text
    # a complete file of another run (its key differs) is not resumed either
    other = Checkpoint(ckpt.path, "another-run")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imgclust.train"):
        assert other.load() is None
    assert "another format or run" in caplog.text
    assert Checkpoint.in_dir(None, "toy").load() is None  # checkpointing off


def test_non_finite_loss_names_the_option():
    model = nn.Linear(2, 1)
    opt = build_optimizer("sgd", model, lr=0.1)
    w0 = model.weight.detach().clone()

    def step(batch, info):
        return model(batch).sum() * (float("nan") if info.step == 2 else 1.0)

    spec = LoopSpec(epochs=1, name="toy", option="lr", option_value=0.1, progress=False)
    with pytest.raises(NonFiniteLoss, match=r"toy: the loss became non-finite \(nan\) at step 2; lower lr \(now 0.1\)"):
        run_loop(model, step, lambda e: [torch.ones(1, 2)] * 4, spec, optimizer=opt)
    assert not torch.equal(model.weight, w0) and torch.isfinite(model.weight).all()  # nan never applied


def test_no_decay_rule():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    net[0].weight.requires_grad_(False)
    decay, plain = param_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["3.weight"]
    assert sorted(names[id(p)] for p in plain["params"]) == ["0.bias", "1.bias", "1.weight", "2.bias", "2.weight"]
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    opt = build_optimizer("adamw", net, lr=1e-3, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert isinstance(build_optimizer("sgd", net, lr=0.1), torch.optim.SGD)
    assert isinstance(build_optimizer("adam", net, lr=0.1), torch.optim.Adam)
    with pytest.raises(Exception, match="optimizer must be one of sgd, adam, adamw"):
        build_optimizer("lamb", net, lr=0.1)


def test_schedule_values():
    np.testing.assert_allclose(schedule("constant", 0.3, 3), [0.3, 0.3, 0.3])
    np.testing.assert_allclose(schedule("cosine", 1.0, 4, final=0.0), [1.0, 0.853553, 0.5, 0.146447], atol=1e-6)
    np.testing.assert_allclose(schedule("warmup-cosine", 2.0, 6, warmup=2, final=0.0),
                               [0.0, 1.0, 2.0, 1.707107, 1.0, 0.292893], atol=1e-6)
    np.testing.assert_allclose(schedule("step", 1.0, 6, milestones=[2, 4], gamma=0.5),
                               [1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    v = schedule("warmup-cosine", 1e-3, 1000, warmup=100, final=1e-5)
    assert v[0] == 0.0 and v[100] == pytest.approx(1e-3) and v[-1] == pytest.approx(1e-5, rel=0.01)
    with pytest.raises(Exception, match="schedule must be one of constant, cosine, warmup-cosine, step"):
        schedule("poly", 1.0, 3)


def test_loop_applies_schedule_per_step():
    model = nn.Linear(1, 1)
    opt = build_optimizer("sgd", model, lr=1.0)
    opt.param_groups[1]["lr_scale"] = 0.5  # the bias group
    seen = []

    def step(batch, info):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        return model(batch).sum()

    run_loop(model, step, lambda e: [torch.ones(1, 1)] * 2,
             LoopSpec(epochs=2, lr=[0.4, 0.3, 0.2, 0.1], progress=False), optimizer=opt)
    assert seen == [(0.4, 0.2), (0.3, 0.15), (0.2, 0.1), (0.1, 0.05)]


def test_the_bar_counts_steps_when_the_epoch_length_is_known_and_a_mid_epoch_resume_starts_at_its_step(tmp_path):
    """Issue 20: a 10M-row epoch lasts ~1.6 h; an epoch-unit bar would sit at 0/1 all that time."""
    from imgclust.progress import record_progress

    class Sink:
        def __init__(self):
            self.events = []

        def event(self, name, **f):
            self.events.append(f)

    model = nn.Linear(2, 1)
    opt = build_optimizer("sgd", model, lr=0.1)
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))

    def step(rows, info):
        if info.step == stop_at[0]:
            raise Killed
        return model(x[rows]).pow(2).mean()

    def run(ckpt):
        spec = LoopSpec(epochs=3, name="toy steps", progress=False, steps_per_epoch=4, checkpoint_every_s=0)
        run_loop(model, step, lambda e: (torch.arange(i, i + 10) for i in range(0, 40, 10)), spec,
                 optimizer=opt, checkpoint=ckpt)

    ckpt = Checkpoint.in_dir(tmp_path, "toy", seed=0)
    stop_at = [6]  # killed at the 3rd step of epoch 1
    sink = Sink()
    with record_progress(sink), pytest.raises(Killed):
        run(ckpt)
    stop_at = [-1]
    sink2 = Sink()
    with record_progress(sink2):
        run(ckpt)
    assert sink.events[0]["total"] == 12 and sink.events[-1]["n"] == 6
    assert sink2.events[0]["n"] == 6 and sink2.events[-1]["n"] == sink2.events[-1]["total"] == 12
