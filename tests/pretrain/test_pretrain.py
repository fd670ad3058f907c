"""Self-supervised pre-training: views, losses, resuming, ``--backbone DIR`` and the CLI, on digits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from imgclust import ImageClusterer
from imgclust.backbones import build_backbone
from imgclust.data import open_source
from imgclust.data.base import SubsetSource
from imgclust.errors import InputError
from imgclust.losses import ssl as losses
from imgclust.pretrain import PretrainConfig, pretrain
from imgclust.pretrain.recipes import METHODS, TwoViews, recipe_for

TINY = dict(image_size=8, batch_size=16, warmup_epochs=0, monitor_size=32, proj_hidden=64, proj_dim=32,
            pred_hidden=64, queue_size=64)


@pytest.fixture(scope="module")
def digits64():
    return SubsetSource.sample(open_source("digits"), 48, seed=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_two_views_differ_but_keep_shape_and_dtype(method, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    x = x if dtype == torch.uint8 else x.float() / 255
    v1, v2 = TwoViews(recipe_for(method), 32)(x, g)
    assert v1.shape == v2.shape == x.shape and v1.dtype == v2.dtype == dtype
    assert (v1.float() - v2.float()).abs().mean() > 0.01 * (255 if dtype == torch.uint8 else 1)
    # the same generator seed gives the same views (resuming depends on it)
    w1, w2 = TwoViews(recipe_for(method), 32)(x, torch.Generator().manual_seed(0))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def _pairs(n=64, d=32, noise=0.1):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, d, generator=g)
    return z + noise * torch.randn(n, d, generator=g), z + noise * torch.randn(n, d, generator=g), g


def test_losses_lower_for_matched_than_shuffled_pairs():
    z1, z2, g = _pairs()
    shuffled = z2[torch.randperm(len(z2), generator=g)]
    assert losses.nt_xent(z1, z2) < losses.nt_xent(z1, shuffled) - 0.5
    assert losses.byol_loss(z1, z2) < losses.byol_loss(z1, shuffled) - 0.5
    assert losses.barlow_twins_loss(z1, z2) < losses.barlow_twins_loss(z1, shuffled) - 1.0
    queue = losses.KeyQueue(32, 128, g)
    assert losses.moco_infonce(z1, z2, queue.keys) < losses.moco_infonce(z1, shuffled, queue.keys) - 0.5
    # alignment is lower for matched pairs, uniformity lower for spread-out than for collapsed features
    assert losses.alignment(z1, z2) < losses.alignment(z1, shuffled)
    assert losses.uniformity(z1) < losses.uniformity(z1[:1].repeat(64, 1) + 0.01 * z1)


def test_nt_xent_matches_definition():
    z1, z2, _ = _pairs(n=5, d=4, noise=0.5)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    s = (z @ z.T / 0.5).exp()
    total = 0.0
    for i in range(10):
        j = (i + 5) % 10
        total += -torch.log(s[i, j] / (s[i].sum() - s[i, i]))
    assert torch.allclose(losses.nt_xent(z1, z2, 0.5), total / 10, atol=1e-5)


def test_key_queue_is_fifo():
    q = losses.KeyQueue(4, 6)
    k = torch.eye(4)
    q.enqueue(k)
    q.enqueue(k[:3])
    assert int(q.ptr) == 1 and torch.allclose(q.keys[4:], k[:2]) and torch.allclose(q.keys[0], k[2])


def _load(out):
    return torch.load(out / "backbone.pt", weights_only=True)


def test_checkpoint_resumes_to_the_same_next_step(tmp_path, digits64):
    cfg = PretrainConfig(method="byol", arch="resnet18", epochs=2, **TINY)
    full = pretrain(digits64, tmp_path / "full", cfg, device="cpu", progress=False)
    part = pretrain(digits64, tmp_path / "part", cfg, device="cpu", progress=False, stop_after_epochs=1)
    assert part["epochs_done"] == 1
    rest = pretrain(digits64, tmp_path / "part", cfg, device="cpu", progress=False)
    assert [h.get("loss") for h in rest["history"]] == [h.get("loss") for h in full["history"]]
    a, b = _load(tmp_path / "full"), _load(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # other options: refuse to resume rather than mix two runs
    with pytest.raises(InputError, match="other options"):
        pretrain(digits64, tmp_path / "part", PretrainConfig(method="byol", epochs=4, **TINY), device="cpu",
                 progress=False)


@pytest.mark.parametrize("method,arch", [("simclr", "vit_tiny"), ("mocov2", "resnet18"), ("barlowtwins", "resnet18")])
def test_each_method_trains_and_reports_the_monitor(tmp_path, digits64, method, arch):
    cfg = PretrainConfig(method=method, arch=arch, epochs=1, precision="bf16" if method == "simclr" else "fp32", **TINY)
    s = pretrain(digits64, tmp_path, cfg, device="cpu", progress=False)
    first, last = s["history"][0], s["history"][-1]
    assert first["epoch"] == 0 and last["epoch"] == 1 and np.isfinite(last["loss"])
    assert {"alignment", "uniformity", "knn_acc", "images_per_s"} <= set(last)
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["arch"] == arch and meta["image_size"] == 8 and meta["history"][-1]["epoch"] == 1


def test_backbone_dir_round_trips(tmp_path, digits64):
    out = tmp_path / "bb"
    cfg = PretrainConfig(method="simclr", arch="resnet18", epochs=1, **TINY)
    pretrain(digits64, out, cfg, device="cpu", progress=False)
    bb = build_backbone(str(out))
    assert bb.dim == 512 and bb.preprocess.size == 8 and bb.name == "pretrained:bb"
    sd = _load(out)
    assert all(torch.equal(bb.state_dict()[k], sd[k]) for k in sd)
    assert not any(p.requires_grad for p in bb.parameters())
    est = ImageClusterer(n_clusters=4, backbone=str(out), cache_dir=str(tmp_path / "cache"), progress=False)
    labels = est.fit_predict(digits64)
    assert len(labels) == 48 and len(set(labels.tolist())) > 1
    est.save(tmp_path / "model")
    again = ImageClusterer.load(tmp_path / "model").predict(digits64)
    assert np.array_equal(again, labels)
    # a directory that is not a pretrained backbone stays an unknown backbone name
    with pytest.raises(InputError, match="unknown backbone"):
        build_backbone(str(tmp_path))


def test_cli_pretrain_on_digits(tmp_path):
    env = dict(os.environ, IMGCLUST_QUIET="1", OMP_NUM_THREADS="1")
    out = tmp_path / "pt"
    r = subprocess.run([sys.executable, "-m", "imgclust.cli", "pretrain", "digits", "--out", str(out), "--limit", "32",
                        "--epochs", "1", "--batch-size", "16", "--image-size", "8", "--quiet",
                        "--option", "warmup_epochs=0", "--option", "monitor_size=32"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stdout and "kNN acc" in r.stdout and (out / "backbone.pt").is_file()
    bad = subprocess.run([sys.executable, "-m", "imgclust.cli", "pretrain", "digits", "--out", str(out), "--method", "dino"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "method must be one of simclr, mocov2" in bad.stderr
