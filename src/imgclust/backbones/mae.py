"""Masked-autoencoder ViT (MAE, He et al. 2022) as used by PICI: a ViT encoder that sees only
the visible patches, plus a transformer decoder that reconstructs the masked ones.

Shapes (B images, C channels, side S, patch P, L = (S / P)^2 patches, D encoder width):

* ``patchify``: (B, C, S, S) -> (B, L, P*P*C), the reconstruction target.
* ``random_masking``: per image, L * (1 - ratio) patches (rounded down) are kept, chosen by
  ranking uniform noise drawn from an explicit ``torch.Generator`` (so a seed fixes the
  masks); ``mask`` is (B, L) with 1 = masked, ``ids_restore`` undoes the shuffle.
* ``forward_encoder``: patch embedding + position embedding -> keep visible tokens ->
  prepend [CLS] -> ``depth`` pre-norm transformer blocks -> LayerNorm. (B, 1 + L_keep, D).
* ``forward_decoder``: Linear to the decoder width, learned [MASK] tokens put back at the
  masked positions, decoder position embedding, ``decoder_depth`` blocks, Linear to
  P*P*C pixels per patch. (B, L, P*P*C).
* ``forward`` / ``features``: the [CLS] token, (B, D).

**Masking at inference.** PICI's paper (sec. 4.1) masks with ratio 0.5 during training and
omits the masked random sampling at test time; the reference code (Regan-Zhang/PICI) keeps
masking at test time. This module follows the paper: ``features`` (and ``forward``) always
use all patches (``mask_ratio=0``); masking happens only when a ratio is passed to
``forward_encoder`` in training.

Sizes (``VIT_SIZES``, width / depth / heads): tiny 192 / 12 / 3, small 384 / 6 / 6 (PICI's
ViT-Small: 384 wide, 6 encoder blocks), base 768 / 12 / 12. The decoder defaults to PICI's
512 wide, 8 blocks, 16 heads; both depths can be overridden (CPU runs use 2-4 blocks).
Patch size from the image size (``default_patch_size``): side <= 32 -> side / 8 (32 px ->
patch 4, 16 px -> 2), side <= 64 -> 8, larger -> 16.

Transformer blocks are ``torch.nn.TransformerEncoderLayer`` (pre-norm, GELU, MLP ratio 4,
no dropout) — the same block as timm's ViT, without depending on timm (not importable here).
Position embeddings are learned (MAE uses fixed 2-D sin-cos; learned ones are as good for
the small grids here and need no extra code path for non-square grids).
"""

from __future__ import annotations

import torch
from torch import nn

from imgclust.errors import InputError

#: width, depth, heads of the encoder
VIT_SIZES: dict[str, tuple[int, int, int]] = {"tiny": (192, 12, 3), "small": (384, 6, 6), "base": (768, 12, 12)}


def default_patch_size(image_size: int) -> int:
    """Patch side for an image side: 32 -> 4, 16 -> 2, 64 -> 8, 224 -> 16."""
    if image_size <= 32:
        return max(1, image_size // 8)
    if image_size <= 64:
        return 8
    return 16


def _blocks(dim: int, depth: int, heads: int) -> nn.Sequential:
    return nn.Sequential(*[
        nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                   batch_first=True, norm_first=True)
        for _ in range(depth)])


class MaskedAutoencoderViT(nn.Module):
    """ViT encoder on visible patches + transformer decoder (see the module docstring)."""

    def __init__(self, image_size: int = 32, channels: int = 3, size: str = "tiny", patch_size: int | None = None,
                 depth: int | None = None, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16) -> None:
        super().__init__()
        if size not in VIT_SIZES:
            raise InputError(f"ViT size must be one of {', '.join(VIT_SIZES)}; got {size!r}")
        p = int(patch_size or default_patch_size(image_size))
        if p < 1 or image_size % p:
            raise InputError(f"patch size {p} does not divide the image size {image_size}")
        dim, default_depth, heads = VIT_SIZES[size]
        if decoder_dim % decoder_heads:
            raise InputError(f"decoder_dim {decoder_dim} is not a multiple of decoder_heads {decoder_heads}")
        self.image_size, self.channels, self.patch_size, self.dim = int(image_size), int(channels), p, dim
        self.num_patches = (image_size // p) ** 2
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.blocks = _blocks(dim, int(depth or default_depth), heads)
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, decoder_dim))
        self.decoder_blocks = _blocks(decoder_dim, int(decoder_depth), decoder_heads)
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * channels)
        for t in (self.cls_token, self.pos_embed, self.mask_token, self.decoder_pos_embed):
            nn.init.trunc_normal_(t, std=0.02)

    # ------------------------------------------------------------------ patches and masks
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, L, P*P*C), patches in row-major order (the reconstruction target)."""
        b, c, s, _ = imgs.shape
        p, g = self.patch_size, s // self.patch_size
        x = imgs.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, g * g, p * p * c)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep floor(L (1 - ratio)) tokens per row of (B, L, D); returns (kept, mask (B, L), ids_restore)."""
        b, n, d = x.shape
        keep = int(n * (1.0 - mask_ratio))
        noise = torch.rand(b, n, generator=generator).to(x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    # ------------------------------------------------------------------ encoder / decoder
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float = 0.0,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (B, 1 + L_keep, D), mask (B, L) (1 = masked), ids_restore (B, L)."""
        if imgs.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise InputError(f"MAE ViT expects images (B, {self.channels}, {self.image_size}, {self.image_size}); "
                             f"got {tuple(imgs.shape)}")
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        else:
            b, n = x.shape[:2]
            mask = torch.zeros(b, n, device=x.device)
            ids_restore = torch.arange(n, device=x.device).expand(b, n)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, x], dim=1))), mask, ids_restore

    def forward_decoder(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoder tokens -> predicted pixels of every patch, (B, L, P*P*C)."""
        x = self.decoder_embed(tokens)
        b, n = ids_restore.shape
        fill = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        seq = torch.cat([x[:, 1:], fill], dim=1)
        seq = torch.gather(seq, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], seq], dim=1) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:]

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """[CLS] features (B, D) of unmasked images (inference, as in the paper)."""
        return self.forward_encoder(imgs, 0.0)[0][:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.features(imgs)
