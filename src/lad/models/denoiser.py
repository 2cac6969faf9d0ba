"""Latent denoiser: MONAI's ``DiffusionModelUNet`` with the Lad condition.

``conditioning="embedding"`` (default, as the release): the condition vector goes through an MLP to
the time-embedding width and is added to the time embedding. MONAI adds ``class_embedding(labels)``
to that embedding when ``num_class_embeds`` is set, so we enable that path and replace its
``nn.Embedding`` with the MLP: no copy of MONAI's forward is needed.
``conditioning="cross_attention"``: the condition is one context token for MONAI's cross-attention
(at the attention levels).

Latents whose spatial size is not divisible by ``2 ** (levels - 1)`` (small latent depths) are
replicate-padded and the output cropped back, so any latent shape works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from lad.models.base import PretrainedMixin, register_to_config

__all__ = ["LatentDenoiser"]


class LatentDenoiser(PretrainedMixin, nn.Module):
    """Predicts the noise ``eps`` of a noisy latent ``z_t`` at timestep ``t`` given condition ``c``."""

    @register_to_config
    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 8, out_channels: int = 8,
                 channels: tuple[int, ...] = (64, 128, 256), attention_levels: tuple[bool, ...] = (False, False, True),
                 num_res_blocks: int = 1, num_head_channels: int = 32, norm_num_groups: int = 32, cond_dim: int = 0,
                 conditioning: str = "embedding"):
        super().__init__()
        if conditioning not in ("embedding", "cross_attention"):
            raise ValueError(f"conditioning must be embedding or cross_attention, got {conditioning!r}")
        if len(attention_levels) != len(channels):
            raise ValueError("attention_levels needs one flag per level of channels")
        self.cond_dim, self.conditioning = cond_dim, conditioning
        cross = cond_dim > 0 and conditioning == "cross_attention"
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, channels=tuple(channels), attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups, num_head_channels=num_head_channels,
            with_conditioning=cross, cross_attention_dim=cond_dim if cross else None,
            num_class_embeds=1 if cond_dim > 0 and conditioning == "embedding" else None,
        )
        if cond_dim > 0 and conditioning == "embedding":
            width = channels[0] * 4  # MONAI's time-embedding width
            self.unet.class_embedding = nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.multiple = 2 ** (len(channels) - 1)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``z_t`` (B, C, d, h, w) float32, ``t`` (B,) long, ``cond`` (B, cond_dim) or None -> eps (B, C, d, h, w)."""
        if self.cond_dim > 0 and cond is None:
            raise ValueError("this denoiser is conditional: pass cond (or the null condition)")
        size = z_t.shape[2:]
        pad = [(-s) % self.multiple for s in size]
        x = z_t
        if any(pad):
            flat = [p for s in reversed(pad) for p in (0, s)]
            x = F.pad(z_t, flat, mode="replicate")
        kwargs = {}
        if self.cond_dim > 0:
            if self.conditioning == "embedding":
                kwargs["class_labels"] = cond
            else:
                kwargs["context"] = cond[:, None, :]
        out = self.unet(x, timesteps=t, **kwargs)
        if any(pad):
            out = out[(slice(None), slice(None), *(slice(0, s) for s in size))]
        return out
