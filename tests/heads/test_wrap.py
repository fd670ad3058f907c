"""heads/wrap.py (one backbone + head wrapper, row-chunked prediction, multi-head helpers) and
heads/projection.py: real behaviour on small tensors."""

import numpy as np
import pytest
import torch

from imgclust.errors import InputError
from imgclust.heads.mlp import MultiHeadMLP
from imgclust.heads.multihead import MultiHeadClassifier
from imgclust.heads.projection import Projection
from imgclust.heads.wrap import BackboneHead, apply_rows, load_multihead, multihead_labels, multihead_logits


def test_backbone_head_is_head_of_backbone_and_trains_both():
    torch.manual_seed(0)
    bb, head = torch.nn.Linear(6, 4), torch.nn.Linear(4, 3)
    net = BackboneHead(bb, head)
    x = torch.randn(5, 6)
    assert torch.equal(net(x), head(bb(x)))
    assert torch.equal(net.classify(net.embed(x)), net(x))
    assert sorted(net.state_dict()) == ["backbone.bias", "backbone.weight", "head.bias", "head.weight"]
    net(x).sum().backward()
    assert bb.weight.grad is not None and head.weight.grad is not None


def test_backbone_head_embeds_in_float32():
    net = BackboneHead(torch.nn.Linear(4, 4).double(), torch.nn.Identity())
    assert net.embed(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float32


def test_apply_rows_chunks_give_the_whole_result_and_empty_input_its_shape():
    lin = torch.nn.Linear(7, 3)
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    with torch.no_grad():
        whole = lin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(apply_rows(lin, x, 3, chunk=8), whole, rtol=1e-6, atol=1e-6)
    assert apply_rows(lin, x[:0], 3).shape == (0, 3)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_multihead_logits_labels_and_reload(kind):
    g = torch.Generator().manual_seed(0)
    heads = (MultiHeadClassifier(8, 4, 3, "l2", generator=g) if kind == "linear"
             else MultiHeadMLP(8, 4, 3, "l2", generator=g, hidden_dim=16, bottleneck_dim=6))
    x = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    logits = multihead_logits(heads, x, chunk=7)
    assert logits.shape == (3, 40, 4)
    np.testing.assert_allclose(multihead_logits(heads, x, head=2), logits[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(multihead_labels(heads, x, chunk=9), logits.argmax(-1))
    assert multihead_logits(heads, x[:0]).shape == (3, 0, 4) and multihead_logits(heads, x[:0], head=0).shape == (0, 4)
    state = {f"t.{k}": v for k, v in heads.state_dict().items()}
    back = load_multihead(state, "t.", kind, "l2", 4, "temi")
    np.testing.assert_array_equal(multihead_labels(back, x), multihead_labels(heads, x))
    assert not any(p.requires_grad for p in back.parameters())
    with pytest.raises(InputError, match="K=4 clusters, expected 5"):
        load_multihead(state, "t.", kind, "l2", 5, "temi")
    with pytest.raises(InputError, match="not a temi state"):
        load_multihead({}, "t.", kind, "l2", 4, "temi")


def test_projection_standardizes_encodes_and_reloads():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(64, 5)).astype(np.float32)
    x[:, 4] = 1.0  # a constant column: std floored, no 0/0
    torch.manual_seed(0)
    p = Projection(5, 3, hidden_dim=8)
    p.set_standardization(x)
    xs = p.standardize(torch.from_numpy(x))
    assert torch.isfinite(xs).all() and abs(float(xs[:, :4].mean())) < 1e-5
    z = p.encode_standardized(xs, chunk=10)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    state = {f"head.{k}": v for k, v in p.state_dict().items()}
    back = Projection.from_state(state, "head.", 3, 8)
    np.testing.assert_allclose(back.encode_standardized(back.standardize(torch.from_numpy(x))), z, rtol=1e-6)
    with pytest.raises(InputError, match="hidden_dim=4"):
        Projection.from_state(state, "head.", 3, 4)
    state["head.net.0.weight"] = state["head.net.0.weight"] * float("nan")
    with pytest.raises(InputError, match="non-finite"):
        Projection.from_state(state, "head.", 3, 8)


def test_labelling_many_rows_reports_progress_and_keeps_the_labels(monkeypatch):
    """Issue 20: at 10M rows x 50 heads the labelling after the last step takes ~12 min, and it was silent."""
    import imgclust.heads.wrap as wrap
    from imgclust.progress import record_progress

    class Sink:
        def __init__(self):
            self.events = []

        def event(self, name, **f):
            self.events.append((name, f))

    heads = MultiHeadClassifier(8, 4, 3, "l2", generator=torch.Generator().manual_seed(0))
    x = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    quiet = multihead_labels(heads, x, chunk=9)
    monkeypatch.setattr(wrap, "LABEL_BAR_MIN_ROWS", 30)
    big, small = Sink(), Sink()
    with record_progress(big):
        labels = multihead_labels(heads, x, chunk=9)
    with record_progress(small):
        multihead_labels(heads, x[:20], chunk=9)
    np.testing.assert_array_equal(labels, quiet)
    assert big.events and all(name == "progress" for name, _ in big.events)
    assert "3 heads" in big.events[-1][1]["stage"]
    assert big.events[-1][1]["n"] == big.events[-1][1]["total"] == 40
    assert small.events == []  # below the threshold: no bar, no log noise
