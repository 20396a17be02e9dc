"""MAE (He et al. 2022) for small grey images: random masking with an exact count per image, the timm ViT
encoder on the visible patches only, a light decoder (timm ``Block``s), normalised-pixel loss on the
masked patches. Our own code, not ``lightly``'s, for the reason given in :mod:`qkvprobe.pretrain.common`.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from .augment import normalize, random_resized_crop, to_device
from .common import Objective, PretrainConfig, build_encoder


def random_masking(
    num_images: int,
    num_patches: int,
    mask_ratio: float,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image random permutation → ``keep`` [B, L_keep] indices, ``restore`` [B, L], ``mask`` [B, L] (1 = masked).

    Exactly ``num_patches - int(num_patches * (1 - mask_ratio))`` patches are masked in every image.
    """
    num_keep = int(num_patches * (1 - mask_ratio))
    noise = to_device(torch.rand(num_images, num_patches, generator=gen), torch.device(device))
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(num_images, num_patches, device=device)
    mask[:, :num_keep] = 0
    return shuffle[:, :num_keep], restore, torch.gather(mask, 1, restore)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/p)·(W/p), p·p·C] in row-major patch order (as timm's patch embedding)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


class MAEDecoder(nn.Module):
    """Linear embed → mask tokens → fixed 2-D sin-cos positions → ``depth`` Blocks → pixels per patch."""

    def __init__(self, enc_dim: int, dim: int, depth: int, grid: tuple[int, int], patch_pixels: int) -> None:
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = build_sincos2d_pos_embed(list(grid), dim)  # [L, dim], row-major like the patch order
        self.register_buffer("pos", pos.reshape(1, -1, dim), persistent=False)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads=4, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+L_keep, D_enc] (cls first), restore [B, L] → predicted pixels [B, L, p·p·C]."""
        x = self.embed(latent)
        B, L = restore.shape
        patches = torch.cat([x[:, 1:], self.mask_token.expand(B, L - x.shape[1] + 1, -1)], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches + self.pos], dim=1)
        return self.pred(self.norm(self.blocks(x)))[:, 1:]


class MAE(Objective):
    """Encoder (timm ViT) + decoder; ``step`` returns the masked normalised-pixel MSE of one batch."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.encoder, kwargs = build_encoder(cfg.arch)
        p = kwargs["patch_size"]
        grid = (kwargs["img_size"] // p, kwargs["img_size"] // p)
        self.decoder = MAEDecoder(
            self.encoder.embed_dim, cfg.decoder_dim, cfg.decoder_depth, grid, p * p * kwargs["in_chans"]
        )
        self.modules = nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder})
        self.patch = p

    def parameters(self) -> list[nn.Parameter]:
        return list(self.modules.parameters())

    def encode(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Run the timm encoder on the cls token + visible patches; [B, 1+L_keep, D] after the final norm."""
        enc = self.encoder
        # timm's own embedding path (patch embed + dynamic position embedding + cls), then we drop patches.
        t = enc._pos_embed(enc.patch_embed(x))
        n = enc.num_prefix_tokens
        vis = torch.gather(t[:, n:], 1, keep[..., None].expand(-1, -1, t.shape[-1]))
        t = enc.norm_pre(torch.cat([t[:, :n], vis], dim=1))
        return enc.norm(enc.blocks(t))

    def step(self, x: torch.Tensor, gen: torch.Generator, it: float, total: int) -> torch.Tensor:
        dev = next(self.encoder.parameters()).device
        x = normalize(random_resized_crop(to_device(x, dev), 28, (0.35, 1.0), gen))
        target = patchify(x, self.patch)
        keep, restore, mask = random_masking(x.shape[0], target.shape[1], self.cfg.mask_ratio, gen, dev)
        pred = self.decoder(self.encode(x, keep), restore).float()
        # Normalised-pixel target (per patch mean/var), as MAE's norm_pix_loss; loss on masked patches only.
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()
