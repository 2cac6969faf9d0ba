"""Condition Extractor (paper 3.3.2, Figure 3): content vector + Betti-number structure vector.

Content: the *frozen* VQ-GAN encoder applied to the mask (``encode_mask``), then two trainable
strided convolutions (Conv(8 -> 4, s2) -> Conv(4 -> 1, s2): 512 numbers for an 8 x 8 x 64 x 64
latent). The release re-created these two layers on every call, so they were never trained nor
saved; here they are registered parameters, trained with the denoiser and saved with the run.
Structure: the per-slice Betti vector (``lad.topology``, D x 6 counts) as ``log1p`` values through a
small MLP. Both parts are concatenated; either can be switched off (ablations V1 / V2). The learned
null condition of classifier-free guidance (``null_cond``) lives here too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lad.models.base import PretrainedMixin, register_to_config

__all__ = ["ConditionExtractor", "encode_mask"]


@torch.no_grad()
def encode_mask(vqgan: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Mask ``(B, 1, D, H, W)`` uint8 in {0, 1, 2} -> frozen-encoder latent ``(B, C, d, h, w)``.

    The mask enters the encoder scaled to the image range as ``mask / 2`` (0, 0.5, 1).
    """
    return vqgan.encode(mask.float() / 2.0)


class ConditionExtractor(PretrainedMixin, nn.Module):
    """Maps (encoded mask, Betti vector) to the condition vector ``c`` of size ``cond_dim``."""

    @register_to_config
    def __init__(self, *, latent_channels: int = 8, latent_shape: tuple[int, int, int] = (8, 64, 64), num_slices: int = 32,
                 use_content: bool = True, use_structure: bool = True, content_channels: tuple[int, int] = (4, 1),
                 structure_dim: int = 192):
        super().__init__()
        if not (use_content or use_structure):
            raise ValueError("a ConditionExtractor needs content, structure or both (use no extractor for V0)")
        self.use_content, self.use_structure = use_content, use_structure
        self.content_dim = 0
        if use_content:
            c1, c2 = content_channels
            self.content = nn.Sequential(
                nn.Conv3d(latent_channels, c1, 3, stride=2, padding=1), nn.SiLU(), nn.Conv3d(c1, c2, 3, stride=2, padding=1)
            )
            down = [math.ceil(math.ceil(s / 2) / 2) for s in latent_shape]
            self.content_dim = c2 * down[0] * down[1] * down[2]
        self.structure_dim = 0
        if use_structure:
            self.structure = nn.Sequential(nn.Linear(num_slices * 6, structure_dim), nn.SiLU(), nn.Linear(structure_dim, structure_dim))
            self.structure_dim = structure_dim
        self.null_cond = nn.Parameter(torch.zeros(self.cond_dim))

    @property
    def cond_dim(self) -> int:
        return self.content_dim + self.structure_dim

    def forward(self, mask_latent: torch.Tensor | None, betti: torch.Tensor | None) -> torch.Tensor:
        """``mask_latent`` (B, C, d, h, w) from ``encode_mask``; ``betti`` (B, D*6) log1p counts -> (B, cond_dim)."""
        parts = []
        if self.use_content:
            if mask_latent is None:
                raise ValueError("this extractor uses content: pass the encoded mask")
            parts.append(self.content(mask_latent).flatten(1))
        if self.use_structure:
            if betti is None:
                raise ValueError("this extractor uses structure: pass the Betti vector")
            parts.append(self.structure(betti.float()))
        return torch.cat(parts, dim=1)
