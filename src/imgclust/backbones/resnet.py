"""ResNet-18/34/50/101 in plain torch with torchvision's state-dict layout, minus ``fc``.

Keys are those of ``torchvision.models.resnet``: ``conv1``, ``bn1``, ``layer{1-4}.{j}.conv1/bn1/
conv2/bn2[/conv3/bn3]`` and ``layer{n}.0.downsample.0/1`` (ResNet v1.5: the stride sits in the
3x3 conv of a bottleneck). The classifier ``fc`` is dropped, so ``forward`` returns the
global-average-pooled features (512-d for 18/34, 2048-d for 50/101) and checkpoint ``fc.*``
keys are ignored.

``small_images=True`` swaps the stem for a 3x3 stride-1 conv without max-pool (the CIFAR
variant used by SimCLR/MoCo/SCAN for 32x32 inputs); its ``conv1`` is (64, 3, 3, 3), so
ImageNet weights do not fit it: use it with ``pretrained=False`` or your own ``weights``.
:func:`build_resnet` makes a trainable model without the registry (for pre-training).

Registered (frozen, ImageNet mean/std, bilinear, ``resize="squash"`` by default):

* ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision ImageNet-1k supervised weights
  (``IMAGENET1K_V1``);
* ``mocov2_resnet50``: MoCo v2, 800 epochs (``moco_v2_800ep_pretrain.pth.tar``; keys
  ``module.encoder_q.*``, the projection head ``fc.*`` and the key encoder are dropped);
* ``dino_resnet50``: DINO ResNet-50.

Options: ``weights`` (local checkpoint: torchvision layout, MoCo ``module.encoder_q.``,
``module.``/``backbone.``/``encoder.`` wrappers), ``pretrained``, ``image_size`` (default 224,
32 with ``small_images``), ``small_images``, ``resize``, ``crop_pct``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclust.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneInfo,
    Preprocess,
    register_backbone,
)
from imgclust.backbones.weights import (
    check_options,
    freeze,
    load_strict,
    resolve_weights,
    seeded_init,
    strip_wrappers,
)
from imgclust.errors import InputError


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(cin, planes * 4, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(Backbone):
    """torchvision-layout ResNet without ``fc``; ``forward`` -> pooled features (B, dim)."""

    def __init__(self, depth: int = 50, small_images: bool = False):
        super().__init__()
        if depth not in _DEPTHS:
            raise InputError(f"ResNet depth must be one of {sorted(_DEPTHS)}, got {depth}")
        block, counts = _DEPTHS[depth]
        self.depth, self.small_images = depth, small_images
        self.name = f"resnet{depth}" + ("-small" if small_images else "")
        self.dim = 512 * block.expansion
        self.weights_id = "random"
        self.preprocess = _preprocess(32 if small_images else 224, "squash", 0.875)
        if small_images:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), counts)):
            layers = []
            for j in range(n):
                layers.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, dim, h, w) before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_maps(x).mean(dim=(2, 3))


def _preprocess(size: int, resize: str, crop_pct: float) -> Preprocess:
    return Preprocess(
        size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=resize, crop_pct=crop_pct, interpolation="bilinear"
    )


def build_resnet(depth: int = 50, small_images: bool = False) -> ResNet:
    """A randomly initialised, trainable torchvision-layout ResNet (no registry, no weights)."""
    return ResNet(depth, small_images)


def adapt_resnet_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MoCo (``module.encoder_q.``) and wrapped checkpoints -> torchvision keys, ``fc.*`` dropped."""
    q = "module.encoder_q."
    if any(k.startswith(q) for k in sd):
        sd = {k[len(q):]: v for k, v in sd.items() if k.startswith(q)}
    sd = strip_wrappers(sd, ("module.", "backbone.", "encoder."))
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


@dataclass(frozen=True)
class _Entry:
    depth: int
    url: str
    description: str


_TV = "https://download.pytorch.org/models/"
RESNET_ENTRIES = {
    "resnet18": _Entry(18, _TV + "resnet18-f37072fd.pth", "ResNet-18, torchvision ImageNet-1k supervised, 512-d"),
    "resnet34": _Entry(34, _TV + "resnet34-b627a593.pth", "ResNet-34, torchvision ImageNet-1k supervised, 512-d"),
    "resnet50": _Entry(50, _TV + "resnet50-0676ba61.pth", "ResNet-50, torchvision ImageNet-1k supervised (V1), 2048-d"),
    "mocov2_resnet50": _Entry(
        50,
        "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        "ResNet-50, MoCo v2 800 epochs (ImageNet, self-supervised), 2048-d",
    ),
    "dino_resnet50": _Entry(
        50,
        "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        "ResNet-50, DINO (ImageNet, self-supervised), 2048-d",
    ),
}


def build_registered_resnet(
    key: str,
    weights: str | Path | None = None,
    pretrained: bool = True,
    image_size: int | None = None,
    small_images: bool = False,
    resize: str = "squash",
    crop_pct: float = 0.875,
) -> ResNet:
    entry = RESNET_ENTRIES[key]
    if small_images and weights is None and pretrained:
        raise InputError(
            f"{key}: small_images=True changes the stem, so the official ImageNet weights do not fit; "
            "pass --weights PATH (a small-image checkpoint) or --backbone-option pretrained=false"
        )
    size = (32 if small_images else 224) if image_size is None else int(image_size)
    if size < 1:
        raise InputError(f"image_size must be >= 1, got {size}")
    sd, weights_id, source = resolve_weights(weights, entry.url, pretrained, key)
    with seeded_init():
        model = ResNet(entry.depth, small_images)
    if sd is not None:
        load_strict(model, adapt_resnet_state_dict(sd), source, key)
    model.name = key + ("-small" if small_images else "")
    model.weights_id = weights_id
    model.preprocess = _preprocess(size, resize, crop_pct)
    return freeze(model)


_OPTIONS = ("weights", "pretrained", "image_size", "small_images", "resize", "crop_pct")


def _factory(key: str):
    def factory(
        weights=None, pretrained=True, image_size=None, small_images=False, resize="squash", crop_pct=0.875, **extra
    ):
        check_options(key, extra, _OPTIONS)
        return build_registered_resnet(key, weights, pretrained, image_size, small_images, resize, crop_pct)

    factory.__name__ = f"build_{key}"
    return factory


for _key, _entry in RESNET_ENTRIES.items():
    register_backbone(
        BackboneInfo(name=_key, factory=_factory(_key), description=_entry.description, offline=False, family="resnet")
    )
