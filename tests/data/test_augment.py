"""Weak / strong augmentations: real transformations, shapes and dtypes kept, deterministic under a seed."""

import numpy as np
import pytest
import torch

from imgclust.data.augment import (
    AugmentSpec,
    augment,
    cutout,
    rand_augment,
    random_shift,
)
from imgclust.errors import InputError


def _images(n=8, c=3, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, s, s, generator=g) * 255).to(torch.uint8)


@pytest.mark.parametrize("kind", ["weak", "strong"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_views_keep_shape_and_dtype_and_differ(kind, dtype):
    x = _images()
    x = x if dtype == torch.uint8 else x.float() / 255
    y = augment(x, kind, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    if dtype == torch.float32:
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    changed = (y.float() != x.float()).flatten(1).any(1)
    assert changed.float().mean() >= 0.5  # most images are transformed


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_views_are_deterministic_under_a_seed(kind):
    x = _images(16)
    a = augment(x, kind, torch.Generator().manual_seed(7))
    b = augment(x, kind, torch.Generator().manual_seed(7))
    c = augment(x, kind, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_grayscale_and_non_square_images_work():
    x = torch.rand(4, 1, 20, 28)
    for kind in ("weak", "strong"):
        assert augment(x, kind, torch.Generator().manual_seed(0)).shape == x.shape


def test_weak_view_is_a_flip_and_integer_shift_of_the_input():
    x = _images(6, s=16).float() / 255
    y = augment(x, "weak", torch.Generator().manual_seed(3), AugmentSpec(shift=0.125))  # up to 2 px
    s = 2
    for i in range(len(x)):
        found = False
        for img in (x[i], x[i].flip(-1)):
            padded = torch.nn.functional.pad(img[None], (s, s, s, s), mode="reflect")[0]
            for oy in range(2 * s + 1):
                for ox in range(2 * s + 1):
                    if torch.equal(padded[:, oy:oy + 16, ox:ox + 16], y[i]):
                        found = True
        assert found, f"image {i} is not a flipped/shifted copy"


def test_random_shift_zero_is_identity():
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(random_shift(x, torch.Generator(), 0.0), x)


def test_cutout_fills_one_square_with_grey():
    x = torch.zeros(32, 3, 16, 16)
    y = cutout(x, torch.Generator().manual_seed(0), 0.5)
    holes = (y == 0.5).all(dim=1)  # (B, H, W)
    sizes = holes.flatten(1).sum(1)
    assert int(sizes.max()) <= 64 and int(sizes.max()) > 0  # side <= 8 px
    for i in range(len(x)):
        if sizes[i]:
            rows, cols = torch.nonzero(holes[i], as_tuple=True)
            # a rectangle (clipped square): every pixel of its bounding box is in the hole
            assert int(sizes[i]) == (int(rows.max()) - int(rows.min()) + 1) * (int(cols.max()) - int(cols.min()) + 1)


def test_rand_augment_ops_each_run_and_keep_range():
    x = torch.rand(64, 3, 12, 12)
    y = rand_augment(x, torch.Generator().manual_seed(0), n_ops=4)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert (y != x).flatten(1).any(1).float().mean() > 0.8


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(InputError):
        augment(torch.rand(3, 8, 8), "weak", torch.Generator())
    with pytest.raises(InputError):
        augment(torch.rand(1, 3, 8, 8), "medium", torch.Generator())
    with pytest.raises(InputError):
        AugmentSpec(shift=0.7)
    with pytest.raises(InputError):
        augment(torch.zeros(1, 3, 8, 8, dtype=torch.int32), "weak", torch.Generator())
    assert np.isfinite(augment(torch.zeros(2, 3, 8, 8), "strong", torch.Generator()).numpy()).all()
