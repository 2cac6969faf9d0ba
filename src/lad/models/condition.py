"""Condition Extractor (paper 3.3.2, Figure 3): content vector + Betti-number structure vector.

Content: the *frozen* VQ-GAN encoder applied to the mask (``encode_mask``; the encoder is not part
of this module), then two trainable strided convolutions as in the release,
``Conv3d(8, 4, 3, s2, p1) -> SiLU -> Conv3d(4, 1, 3, s2, p1) -> flatten``: 512 numbers for an
8 x 8 x 64 x 64 latent. The release re-created these two layers on every call, so they were never
trained nor saved (and were random at sampling time); here they are registered sub-modules, trained
with the denoiser and saved with the run. (The SiLU between them is ours: without it the two convs
compose to one linear map.)

Structure: the per-slice Betti vector (``lad.topology.betti_vector``: D x 6 counts) enters already
normalised by ``lad.topology.normalize_betti`` (log1p, float32) and is embedded by a small MLP
(``structure_dim > 0``) or used as is (``structure_dim = 0``).

The condition is the concatenation [content, structure]; either part can be switched off (ablations
V1 = content only, V2 = structure only, full = both; V0 has no extractor). The learned null
condition of classifier-free guidance (``null_cond``) lives here too.

Spatial condition (``spatial_condition``; ours, not the paper's, off in the paper presets): the mask's
organ and tumour occupancy on the latent grid, concatenated to the denoiser's input channels (as
DiffTumor and ControlNet-style models feed a mask). The paper's condition is a vector: it says what
the mask is, but the denoiser must learn where from a few hundred numbers; the map says where, voxel by
voxel. Classifier-free guidance drops it to zeros together with the vector.
"""

from __future__ import annotations

import torch
from torch import nn

from lad.models.base import PretrainedMixin, register_to_config

__all__ = ["ConditionExtractor", "encode_mask", "spatial_condition", "BETTI_PER_SLICE", "MASK_MAX_LABEL", "SPATIAL_CHANNELS"]

BETTI_PER_SLICE = 6  # [b0, b1] for labels 0, 1, 2 (lad.topology.BETTI_PER_SLICE)
MASK_MAX_LABEL = 2  # Lad mask labels {0 background, 1 organ, 2 tumour}
SPATIAL_CHANNELS = 2  # spatial condition: [organ or tumour, tumour] occupancy


@torch.no_grad()
def encode_mask(vqgan: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Encode a Lad mask with the frozen VQ-GAN encoder (content condition, before the trainable convs).

    ``mask``: (B, 1, D, H, W) integer labels in {0, 1, 2} (uint8). It enters the encoder scaled to the
    image range [0, 1] as ``mask / 2`` (background 0, organ 0.5, tumour 1). Runs under
    ``torch.no_grad()`` on the mask's device; keep ``vqgan`` in eval mode and on that device.
    Returns ``vqgan.encode(mask / 2)``: (B, embedding_dim, D/4, H/4, W/4) float32 pre-quantisation latent.
    """
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, D, H, W), got shape {tuple(mask.shape)}")
    if mask.is_floating_point():
        raise ValueError(f"mask must hold integer labels in {{0, 1, 2}}, got dtype {mask.dtype}")
    return vqgan.encode(mask.float() / MASK_MAX_LABEL)


def spatial_condition(mask: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """Occupancy of the Lad mask on the latent grid: (B, 2, D/f0, H/f1, W/f2) float32 in [0, 1].

    ``mask``: (B, 1, D, H, W) integer labels in {0, 1, 2}; ``factors``: the VQ-GAN's down-sampling per axis.
    Channel 0 is the fraction of each latent cell's voxels inside the organ (tumour included, label >= 1),
    channel 1 the fraction inside the tumour (label 2): an average pool with kernel = stride = ``factors``.
    """
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, D, H, W), got shape {tuple(mask.shape)}")
    if mask.is_floating_point():
        raise ValueError(f"mask must hold integer labels in {{0, 1, 2}}, got dtype {mask.dtype}")
    factors = tuple(int(f) for f in factors)
    if len(factors) != 3 or any(s % f for s, f in zip(mask.shape[2:], factors)):
        raise ValueError(f"mask shape {tuple(mask.shape[2:])} is not a multiple of the down-sampling {factors}")
    onehot = torch.cat([mask >= 1, mask == MASK_MAX_LABEL], dim=1).float()
    return torch.nn.functional.avg_pool3d(onehot, kernel_size=factors, stride=factors)


class ConditionExtractor(PretrainedMixin, nn.Module):
    """Maps (encoded mask, normalised Betti vector) to the condition vector ``c`` (B, cond_dim).

    Args:
        latent_channels: channels of the encoded mask (the VQ-GAN's embedding_dim, 8).
        latent_shape: spatial shape (d, h, w) of the encoded mask (8, 64, 64 for a 32 x 256 x 256 window).
        num_slices: D, the number of axial slices of the mask window (the Betti vector has D * 6 entries).
        use_content / use_structure: switch the two parts (at least one).
        content_channels: output channels of the two trainable content convs (release: (4, 1)).
        structure_dim: width of the structure MLP; 0 feeds the normalised Betti vector as is.
    """

    @register_to_config
    def __init__(self, *, latent_channels: int = 8, latent_shape: tuple[int, int, int] = (8, 64, 64), num_slices: int = 32,
                 use_content: bool = True, use_structure: bool = True, content_channels: tuple[int, int] = (4, 1),
                 structure_dim: int = 192):
        super().__init__()
        if not (use_content or use_structure):
            raise ValueError("a ConditionExtractor needs content, structure or both (use no extractor for the unconditional V0)")
        if len(latent_shape) != 3 or min(latent_shape) < 1:
            raise ValueError(f"latent_shape must be (d, h, w) of positive sizes, got {latent_shape!r}")
        if len(content_channels) != 2:
            raise ValueError(f"content_channels must hold the two conv widths, got {content_channels!r}")
        if structure_dim < 0 or num_slices < 1:
            raise ValueError(f"need structure_dim >= 0 and num_slices >= 1, got {structure_dim}, {num_slices}")
        self.use_content, self.use_structure = bool(use_content), bool(use_structure)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.betti_dim = num_slices * BETTI_PER_SLICE
        self.content_dim = 0
        if self.use_content:
            c1, c2 = content_channels
            self.content = nn.Sequential(
                nn.Conv3d(latent_channels, c1, 3, stride=2, padding=1), nn.SiLU(), nn.Conv3d(c1, c2, 3, stride=2, padding=1)
            )
            down = [(s + 1) // 2 for s in self.latent_shape]  # k3 s2 p1: ceil(s / 2), twice
            self.content_dim = c2 * ((down[0] + 1) // 2) * ((down[1] + 1) // 2) * ((down[2] + 1) // 2)
        self.structure_dim = 0
        if self.use_structure:
            if structure_dim > 0:
                self.structure = nn.Sequential(nn.Linear(self.betti_dim, structure_dim), nn.SiLU(),
                                               nn.Linear(structure_dim, structure_dim))
                self.structure_dim = structure_dim
            else:
                self.structure = nn.Identity()
                self.structure_dim = self.betti_dim
        self.null_cond = nn.Parameter(torch.zeros(self.cond_dim))

    @property
    def cond_dim(self) -> int:
        """Size K of the condition vector: content_dim + structure_dim."""
        return self.content_dim + self.structure_dim

    def forward(self, mask_latent: torch.Tensor | None, betti: torch.Tensor | None) -> torch.Tensor:
        """Condition vector of a batch.

        ``mask_latent``: (B, latent_channels, *latent_shape) float32 from ``encode_mask`` (content on; else ignored).
        ``betti``: (B, num_slices * 6) float, ``normalize_betti`` of the per-slice Betti counts (structure on; else ignored).
        Returns (B, cond_dim) float32: [content (content_dim), structure (structure_dim)].
        """
        parts = []
        if self.use_content:
            if mask_latent is None:
                raise ValueError("this ConditionExtractor uses the content condition: pass the encoded mask (encode_mask)")
            if mask_latent.ndim != 5 or tuple(mask_latent.shape[2:]) != self.latent_shape:
                raise ValueError(f"mask_latent must be (B, C, {', '.join(map(str, self.latent_shape))}) as configured "
                                 f"(latent_shape), got shape {tuple(mask_latent.shape)}")
            parts.append(self.content(mask_latent).flatten(1))
        if self.use_structure:
            if betti is None:
                raise ValueError("this ConditionExtractor uses the structure condition: pass the normalised Betti vector")
            if betti.ndim != 2 or betti.shape[1] != self.betti_dim:
                raise ValueError(f"betti must be (B, {self.betti_dim}) = (B, num_slices * 6), got shape {tuple(betti.shape)}")
            if not betti.is_floating_point():
                raise ValueError("betti must be normalised floats (lad.topology.normalize_betti), got integer counts")
            parts.append(self.structure(betti.float()))
        return torch.cat(parts, dim=1)
