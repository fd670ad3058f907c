"""Self-supervised pre-training of a backbone on the user's own images (``imgclust pretrain``).

SimCLR, MoCo v2, BYOL and Barlow Twins (losses in :mod:`imgclust.losses.ssl`, augmentation recipes in
:mod:`.recipes`, the loop in :mod:`.trainer`); the output directory is a backbone:
``--backbone DIR`` (:mod:`imgclust.backbones.pretrained_dir`).
"""

from imgclust.pretrain.trainer import PretrainConfig, pretrain

__all__ = ["PretrainConfig", "pretrain"]
