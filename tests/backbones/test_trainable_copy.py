"""backbones/finetune.trainable_copy: the one helper that makes a trainable copy of a frozen backbone."""

import pytest
import torch

from imgclust.backbones import build_backbone
from imgclust.backbones.finetune import trainable_copy
from imgclust.backbones.resnet import build_resnet
from imgclust.errors import InputError


def _frozen_resnet():
    torch.manual_seed(0)
    net = build_resnet(18, small_images=True)
    net.requires_grad_(False)
    return net.train()  # the copy must come back in eval mode whatever the original's mode


def test_all_scope_trains_every_parameter_of_a_copy_and_leaves_the_original_frozen():
    net = _frozen_resnet()
    bb, named = trainable_copy(net, "all")
    assert bb is not net and not bb.training
    assert [n for n, _ in named] == [n for n, _ in bb.named_parameters()]
    assert all(p.requires_grad for p in bb.parameters())
    assert not any(p.requires_grad for p in net.parameters())
    bb(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for _, p in named)
    assert all(p.grad is None for p in net.parameters())


def test_last_blocks_scope_trains_only_the_last_stage():
    bb, named = trainable_copy(_frozen_resnet(), "last_blocks", 1)
    names = {n for n, _ in named}
    assert names and all(n.startswith("layer4.") for n in names)
    assert {n for n, p in bb.named_parameters() if p.requires_grad} == names


def test_a_backbone_without_parameters():
    px = build_backbone("pixels", image_size=8)
    with pytest.raises(InputError, match="no parameters to fine-tune"):
        trainable_copy(px, "all")
    bb, named = trainable_copy(px, "all", allow_empty=True)
    assert named == [] and bb is not px
