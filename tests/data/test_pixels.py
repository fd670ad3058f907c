"""data/pixels.py: the in-memory uint8 image sets of the from-scratch recipes (PICI, CC)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from imgclust.backbones import build_backbone
from imgclust.data.base import ArraySource
from imgclust.data.pixels import pixels_to_uint8, training_images
from imgclust.errors import InputError
from imgclust.features import extract_features


@pytest.fixture(scope="module")
def digits40():
    d = load_digits()
    return ArraySource((d.images[:40] * (255 / 16)).astype(np.uint8), d.target[:40], name="digits40")


def test_source_and_its_pixel_features_give_the_same_images(digits40):
    feats = np.asarray(extract_features(digits40, build_backbone("pixels", image_size=8), use_cache=False,
                                        progress=False).features)
    from_source, ident_src = training_images(feats, digits40, None, 8, name="cc")
    from_pixels, ident_px = training_images(feats, None, None, 8, name="cc")
    assert from_source.shape == (40, 3, 8, 8) and from_source.dtype.is_floating_point is False
    assert np.abs(from_source.numpy().astype(int) - from_pixels.numpy().astype(int)).max() <= 1
    assert ident_src != ident_px and len(ident_src) == 64
    sub, ident_sub = training_images(feats[:10], digits40, np.arange(10, 20), 8, name="cc")
    np.testing.assert_array_equal(sub.numpy(), from_source[10:20].numpy())
    assert ident_sub != ident_src


def test_wrong_inputs_give_one_line_errors(digits40):
    assert pixels_to_uint8(np.zeros((3, 10), np.float32), 8) is None
    with pytest.raises(InputError, match="cc learns from the images"):
        training_images(np.zeros((3, 10), np.float32), None, None, 8, name="cc")
    with pytest.raises(InputError, match="cc: 5 source rows for 40 feature rows"):
        training_images(np.zeros((40, 192), np.float32), digits40, np.arange(5), 8, name="cc")
