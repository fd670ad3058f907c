"""TEMI's MLP (DINO) heads: the batched program equals H separate per-head modules; training works."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from imgclust.errors import InputError
from imgclust.heads.mlp import MultiHeadMLP, build_heads
from imgclust.methods import FitContext, get_method
from imgclust.metrics import cluster_acc


def reference_head(heads: MultiHeadMLP, h: int) -> nn.Module:
    """Head ``h`` rebuilt as the reference writes it: nn.Sequential + weight_norm(Linear, bias=False)."""
    d, hid, bot, k = heads.in_dim, heads.hidden_dim, heads.bottleneck_dim, heads.n_clusters
    mlp = nn.Sequential(nn.Linear(d, hid), nn.GELU(), nn.Linear(hid, hid), nn.GELU(), nn.Linear(hid, bot))
    last = weight_norm(nn.Linear(bot, k, bias=False))  # weight = g * v / |v| per output row
    with torch.no_grad():
        for lin, w, b in zip((mlp[0], mlp[2], mlp[4]), (heads.fc1_weight, heads.fc2_weight, heads.fc3_weight),
                             (heads.fc1_bias, heads.fc2_bias, heads.fc3_bias)):
            lin.weight.copy_(w[h].T)
            lin.bias.copy_(b[h])
        last.parametrizations.weight.original1.copy_(heads.last_v[h].T)
        last.parametrizations.weight.original0.copy_(heads.last_g[h][:, None])

    class Ref(nn.Module):
        def forward(self, x):
            return last(nn.functional.normalize(mlp(heads.normalize(x)), dim=-1))

    return Ref()


@pytest.mark.parametrize("norm", ["none", "standardize"])
def test_batched_mlp_heads_equal_unbatched_reference(norm):
    g = torch.Generator().manual_seed(0)
    heads = MultiHeadMLP(20, 6, 5, norm, generator=g, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    with torch.no_grad():  # a non-trivial gain, so the weight normalisation is really exercised
        heads.last_g.uniform_(0.5, 2.0, generator=g)
        for b in (heads.fc1_bias, heads.fc2_bias, heads.fc3_bias):
            b.normal_(generator=g)
    if norm == "standardize":
        heads.set_standardization(torch.randn(20, generator=g), torch.rand(20, generator=g) + 0.5)
    x = torch.randn(11, 20, generator=g)
    out = heads(x)
    assert out.shape == (5, 11, 6)
    for h in range(5):
        ref = reference_head(heads, h)(x)
        torch.testing.assert_close(out[h], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads.forward_head(x, h), ref, rtol=1e-5, atol=1e-6)
    # the gradients of the batched program equal the per-head ones too
    out.square().sum().backward()
    grad_batched = heads.fc1_weight.grad.clone()
    heads.zero_grad()
    sum(heads.forward_head(x, h).square().sum() for h in range(5)).backward()
    torch.testing.assert_close(grad_batched, heads.fc1_weight.grad, rtol=1e-4, atol=1e-6)


def test_fixed_gain_gives_cosine_logits_and_seeded_init():
    heads = MultiHeadMLP(12, 4, 3, "l2", generator=torch.Generator().manual_seed(1))
    assert "last_g" not in dict(heads.named_parameters())  # norm_last_layer: gain frozen at 1
    out = heads(torch.randn(7, 12))
    assert out.abs().max() <= 1.0 + 1e-5  # unit bottleneck x unit columns -> cosines
    again = MultiHeadMLP(12, 4, 3, "l2", generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.fc2_weight, heads.fc2_weight)
    with pytest.raises(InputError):
        build_heads("conv", 12, 4, 3, "l2")


def test_temi_with_mlp_heads_clusters_digits_and_round_trips(digits_xy):
    x, y = digits_xy
    opts = {"head": "mlp", "heads": 3, "hidden_dim": 64, "bottleneck_dim": 32, "epochs": 30, "batch_size": 128,
            "k": 10, "warmup_epochs": 1, "momentum": 0.9, "center_neighbors": True}
    m = get_method("temi")(10, opts).fit(x, FitContext(seed=0, progress=False))
    assert m.head_labels_.shape == (3, len(x))
    assert cluster_acc(y, m.labels_) > 0.5  # chance is ~0.1
    again = get_method("temi")(10, opts)
    again.load_state_dict(m.state_dict())
    np.testing.assert_allclose(again.predict_proba(x), m.predict_proba(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError):
        get_method("temi")(10, {"head": "linear"}).load_state_dict(m.state_dict())
