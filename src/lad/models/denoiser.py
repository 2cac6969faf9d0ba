"""Latent denoiser (paper 3.3-3.4): MONAI's ``DiffusionModelUNet`` with the Lad condition.

Conditioning (``cond_dim > 0``):

- ``"embedding"`` (default; ours, not the release's): the condition vector goes through an MLP
  (cond_dim -> 4 * channels[0] -> 4 * channels[0]) and is ADDED to the time embedding, which every
  residual block receives (as MAISI embeds its scalar conditions). MONAI's forward already adds
  ``class_embedding(class_labels)`` to the time embedding when ``num_class_embeds`` is set, so we enable
  that path and replace its ``nn.Embedding`` by the MLP; the continuous vector is passed as
  ``class_labels``. No subclass or copy of MONAI's forward is needed.
- ``"concat"`` (the public release's): the raw condition vector is CONCATENATED to the time embedding
  (after the time MLP), and each residual block's projection of the embedding (SiLU, then linear to
  its width) sees ``[time, condition]``: width 4 * channels[0] + cond_dim. Built on the same MONAI path:
  the time MLP's output is zero-padded on the right by cond_dim, the class embedding places the
  condition in those slots (zeros on the left), so MONAI's sum is the concatenation; every block's
  ``time_emb_proj`` is widened to take it.
- ``"cross_attention"``: a linear map turns the condition into ``num_context_tokens`` tokens of width
  ``context_dim`` that MONAI's transformer blocks attend to (at the attention levels and the middle
  block). One token would make the softmax trivial (a spatially constant bias), hence several.

``cond_dim = 0`` is the unconditional denoiser (ablation V0).

``spatial_channels > 0`` (ours; ``lad.models.condition.spatial_condition``): a map on the latent grid is
concatenated to ``z_t`` along the channels, so the U-Net's first convolution takes
``in_channels + spatial_channels``; the output keeps ``out_channels``.

Small / odd latent sizes: MONAI halves every spatial axis at each level but the last (stride-2 conv,
then nearest x2 up-sampling), so each axis must be a multiple of ``2 ** (len(channels) - 1)``. The rule
here: an axis that is not is replicate-padded at its end up to the next multiple, and the output is
cropped back (default 4 levels: multiples of 8, so depth 2, 4, 5 -> 8; 8 unchanged; 3 levels:
multiples of 4). Padding is a no-op for the paper's latents (8 x 64 x 64); the demo's 4 x 16 x 16 runs
as 8 x 16 x 16 (its step time above includes that).

Default size, chosen by ``benchmarks/bench_denoiser.py``: channels (32, 64, 128, 256), 2 residual
blocks per level, attention at the two coarsest levels and the middle block, 32-channel heads: 41.8 M
parameters with the 704-d condition. It is the full-3D counterpart of the release's pseudo-3D UNet
(dim 64, mults (1, 2, 4, 8), 2 resnet blocks per level, 41.3 M): same 4 levels and block count, and a
3x3x3 conv at width C has 27 C^2 weights against the release's 3x3 per-slice conv at width 2C
(36 C^2), so per-level capacity and per-voxel cost are alike while every conv sees depth.
Training step (forward + backward + Adam, batch 2, 704-d condition) measured with ONE thread, in CPU
seconds (the shared machine's load inflates wall time): latent 8x4x16x16 0.95 s, 8x8x64x64 8.07 s,
peak RSS 2.0 GB: under the issue's 2-core targets (1.75 s, 9.7 s) even on one core; release
3.49 s / 19.4 s, 5.9 GB. Alternatives measured the same way: 1 block per level (29.1 M) 0.71 s /
5.06 s; the 3-level (64, 128, 256), 1 block (29.0 M) 0.89 s / 20.9 s (990 GFLOP per step at
8x8x64x64 against 269 for the 4-level, 1-block net).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from lad.models.base import PretrainedMixin, register_to_config

__all__ = ["LatentDenoiser", "CONDITIONING_MODES"]

CONDITIONING_MODES = ("embedding", "concat", "cross_attention")


class _PlaceAt(nn.Module):
    """``inner(x)`` written into slots ``[start, start + n)`` of a zero vector of width ``width``: MONAI adds the
    class embedding to the time embedding, and the sum of two of these with disjoint slots is a concatenation."""

    def __init__(self, inner: nn.Module, start: int, width: int):
        super().__init__()
        self.inner, self.start, self.width = inner, start, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return F.pad(y, (self.start, self.width - self.start - y.shape[-1]))


class LatentDenoiser(PretrainedMixin, nn.Module):
    """Predicts the noise ``eps`` of a noisy latent ``z_t`` at timestep ``t`` given the condition ``cond``.

    Args:
        spatial_dims: 3 (volumes) or 2 (slices).
        in_channels / out_channels: latent channels (the VQ-GAN's embedding_dim, 8).
        channels: width per level; len(channels) - 1 down-samplings by 2.
        attention_levels: self- (or cross-) attention per level.
        num_res_blocks: residual blocks per level (int or one per level).
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every width).
        cond_dim: size of the condition vector (ConditionExtractor.cond_dim); 0 = unconditional.
        conditioning: "embedding" (an MLP's output added to the time embedding; ours), "concat" (the raw
            vector concatenated to the time embedding; the release's) or "cross_attention".
        num_context_tokens / context_dim: cross-attention tokens made from the condition.
        spatial_channels: channels of a spatial condition map concatenated to the input (0: none; ours).
    """

    @register_to_config
    def __init__(self, *, spatial_dims: int = 3, in_channels: int = 8, out_channels: int = 8,
                 channels: tuple[int, ...] = (32, 64, 128, 256), attention_levels: tuple[bool, ...] = (False, False, True, True),
                 num_res_blocks: int | tuple[int, ...] = 2, num_head_channels: int = 32, norm_num_groups: int = 32,
                 cond_dim: int = 0, conditioning: str = "embedding", num_context_tokens: int = 8, context_dim: int = 64,
                 spatial_channels: int = 0):
        super().__init__()
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        if len(attention_levels) != len(channels):
            raise ValueError(f"attention_levels needs one flag per level of channels {tuple(channels)}, got {tuple(attention_levels)}")
        if spatial_channels < 0:
            raise ValueError(f"spatial_channels must be >= 0, got {spatial_channels}")
        if cond_dim < 0 or num_context_tokens < 1 or context_dim < 1:
            raise ValueError(f"need cond_dim >= 0, num_context_tokens >= 1, context_dim >= 1, got {cond_dim}, "
                             f"{num_context_tokens}, {context_dim}")
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.cond_dim, self.conditioning, self.spatial_channels = cond_dim, conditioning, int(spatial_channels)
        embed = cond_dim > 0 and conditioning in ("embedding", "concat")
        cross = cond_dim > 0 and conditioning == "cross_attention"
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims, in_channels=in_channels + self.spatial_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, channels=tuple(channels), attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups, num_head_channels=num_head_channels,
            with_conditioning=cross, cross_attention_dim=context_dim if cross else None,
            num_class_embeds=1 if embed else None,
        )
        width = channels[0] * 4  # MONAI's time-embedding width
        if embed and conditioning == "embedding":
            self.unet.class_embedding = nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width))
        if embed and conditioning == "concat":
            self.unet.time_embed = _PlaceAt(self.unet.time_embed, 0, width + cond_dim)
            self.unet.class_embedding = _PlaceAt(nn.Identity(), width, width + cond_dim)
            for block in self.unet.modules():
                if isinstance(getattr(block, "time_emb_proj", None), nn.Linear):
                    block.time_emb_proj = nn.Linear(width + cond_dim, block.time_emb_proj.out_features)
        if cross:
            self.context_proj = nn.Linear(cond_dim, num_context_tokens * context_dim)
            self.num_context_tokens, self.context_dim = num_context_tokens, context_dim
        self.multiple = 2 ** (len(channels) - 1)

    def padded_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial shape the U-Net really runs on (each axis rounded up to a multiple of 2 ** (levels - 1))."""
        return tuple(-(-s // self.multiple) * self.multiple for s in spatial)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                spatial: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction.

        ``z_t``: (B, in_channels, d, h, w) float32 (2D: (B, C, h, w)), the noisy scaled latent;
        ``t``: (B,) long timesteps in [0, T); ``cond``: (B, cond_dim) float32, or None when cond_dim = 0;
        ``spatial``: (B, spatial_channels, d, h, w) when spatial_channels > 0 (zeros: the null map), else None.
        Returns eps: (B, out_channels, d, h, w) float32, same spatial shape as ``z_t``.
        """
        if z_t.ndim != self.spatial_dims + 2 or z_t.shape[1] != self.in_channels:
            raise ValueError(f"z_t must be (B, {self.in_channels}, {'d, h, w' if self.spatial_dims == 3 else 'h, w'}), "
                             f"got shape {tuple(z_t.shape)}")
        b = z_t.shape[0]
        if t.ndim != 1 or t.shape[0] != b:
            raise ValueError(f"t must be (B,) = ({b},) timesteps, got shape {tuple(t.shape)}")
        kwargs = {}
        if self.cond_dim > 0:
            if cond is None:
                raise ValueError("this denoiser is conditional: pass cond (or the null condition)")
            if cond.shape != (b, self.cond_dim):
                raise ValueError(f"cond must be (B, cond_dim) = ({b}, {self.cond_dim}), got shape {tuple(cond.shape)}")
            if self.conditioning in ("embedding", "concat"):
                kwargs["class_labels"] = cond
            else:
                kwargs["context"] = self.context_proj(cond).view(b, self.num_context_tokens, self.context_dim)
        elif cond is not None:
            raise ValueError("this denoiser is unconditional (cond_dim=0): pass cond=None")
        x = z_t
        if self.spatial_channels:
            if spatial is None or spatial.shape != (b, self.spatial_channels, *z_t.shape[2:]):
                got = None if spatial is None else tuple(spatial.shape)
                raise ValueError(f"this denoiser takes a spatial condition of shape (B, {self.spatial_channels}, "
                                 f"{', '.join(map(str, z_t.shape[2:]))}), got {got}")
            x = torch.cat([z_t, spatial.to(z_t.dtype)], dim=1)
        elif spatial is not None:
            raise ValueError("this denoiser has no spatial condition (spatial_channels=0): pass spatial=None")
        size = tuple(z_t.shape[2:])
        pad = [p - s for p, s in zip(self.padded_shape(size), size)]
        if any(pad):
            x = F.pad(x, [q for p in reversed(pad) for q in (0, p)], mode="replicate")
        out = self.unet(x, timesteps=t, **kwargs)
        if any(pad):
            out = out[(slice(None), slice(None), *(slice(0, s) for s in size))]
        return out
