"""Losses of the VQ-GAN stage: the Locality Loss (paper eq. 2-3), hinge GAN terms, feature matching.

``VQGANLoss`` combines them with the public release's weights: L1 x4, perceptual x4 on one
random axial slice, 2D and 3D PatchGAN x0.25 each (hinge), feature matching x4, discriminators on
after ``disc_start`` steps, plus ``locality_weight`` (lambda, default 1.0) x Locality Loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lad.models.discriminator import PatchDiscriminator

__all__ = ["locality_loss", "mask_bounding_boxes", "hinge_d_loss", "hinge_g_loss", "feature_matching_loss", "VQGANLoss"]


def mask_bounding_boxes(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample bounding box of labels {1, 2} as a voxel mask, computed on the tensor's device.

    ``mask`` (B, 1, D, H, W) (any integer/float dtype) -> ``(box, nonempty)``: ``box`` (B, 1, D, H, W)
    float32 (1 inside the box), ``nonempty`` (B,) bool. No host synchronisation.
    """
    fg = mask > 0
    b = fg.shape[0]
    box = torch.ones_like(fg, dtype=torch.float32)
    spatial = list(range(2, fg.ndim))
    for ax in spatial:
        present = fg.movedim(ax, 1).flatten(2).any(2)  # (B, L): slices along this axis holding labels
        n = present.shape[1]
        ar = torch.arange(n, device=fg.device)
        lo = torch.argmax(present.int(), dim=1)
        hi = n - 1 - torch.argmax(present.flip(1).int(), dim=1)
        inside = (ar[None] >= lo[:, None]) & (ar[None] <= hi[:, None])  # (B, L)
        shape = [b] + [1] * (fg.ndim - 1)
        shape[ax] = n
        box = box * inside.view(shape).float()
    nonempty = fg.flatten(1).any(1)
    return box, nonempty


def locality_loss(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor, *, world: int = 1) -> torch.Tensor:
    """Locality Loss (eq. 2): L1 inside the bounding box of mask labels {1, 2}, averaged over samples.

    Per sample: mean absolute difference over the box's voxels (``|x_sub - x_hat_sub|`` as L1 mean);
    then the mean over the samples whose mask is non-empty (empty masks contribute nothing; an
    all-empty batch gives 0 with a gradient path). ``x``, ``x_hat`` (B, C, D, H, W); ``mask`` (B, 1, D, H, W).

    ``world > 1`` (data-parallel training, this rank holds part of the global batch): the count of
    non-empty samples is all-reduced and the value multiplied by ``world``, so that DDP's mean of the
    ranks' gradients is the gradient of the GLOBAL batch's mean (the per-rank means would weight a
    rank's samples by 1 / its own count); the mean over ranks of the returned values is the global value.
    """
    box, nonempty = mask_bounding_boxes(mask)
    diff = (x - x_hat).abs() * box
    per_sample = diff.flatten(1).sum(1) / (box.flatten(1).sum(1) * x.shape[1]).clamp(min=1.0)
    weight = nonempty.to(per_sample.dtype)
    count = weight.sum()
    if world > 1:
        dist.all_reduce(count)
    return world * (per_sample * weight).sum() / count.clamp(min=1.0)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``mean(relu(1 - real)) + mean(relu(1 + fake))``, halved as in taming."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: ``-mean(fake)``."""
    return -logits_fake.mean()


def feature_matching_loss(feats_real: list[torch.Tensor], feats_fake: list[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """L1 between intermediate discriminator features (real detached), over the layers before the logits:
    ``"sum"`` as the public release (its per-layer weight 4 / (n_layers + 1) is 1 for 3 layers), or ``"mean"``
    (ours, the demo and tiny presets: 1 / (n_layers + 1) of the release's weight)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    layers = list(zip(feats_real[:-1], feats_fake[:-1]))
    total = sum(F.l1_loss(f, r.detach()) for r, f in layers)
    return total if reduction == "sum" else total / max(len(layers), 1)


class VQGANLoss(nn.Module):
    """All VQ-GAN training terms; owns the 2D and 3D discriminators."""

    def __init__(self, *, l1_weight: float = 4.0, perceptual_weight: float = 4.0, perceptual: nn.Module | None = None,
                 disc2d_weight: float = 0.25, disc3d_weight: float = 0.25, feature_matching_weight: float = 4.0,
                 locality_weight: float = 1.0, disc_start: int = 50000, spatial_dims: int = 3, disc_channels: int = 64,
                 disc_layers: int = 3, disc_kernel: int = 3, feature_matching: str = "mean"):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.l1_weight, self.perceptual_weight = l1_weight, perceptual_weight
        self.disc2d_weight, self.disc3d_weight = disc2d_weight, disc3d_weight
        self.feature_matching_weight, self.locality_weight, self.disc_start = feature_matching_weight, locality_weight, disc_start
        self.perceptual = perceptual
        self.rank, self.world = 0, 1  # data-parallel shard of the global batch (set_shard)
        self.feature_matching = feature_matching
        self.disc2d = PatchDiscriminator(spatial_dims=2, channels=disc_channels, num_layers=disc_layers, kernel_size=disc_kernel)
        # for 2D images the 2D discriminator sees the whole image and there is no 3D one
        self.disc3d = PatchDiscriminator(spatial_dims=3, channels=disc_channels, num_layers=disc_layers,
                                         kernel_size=disc_kernel) if spatial_dims == 3 else None

    def set_shard(self, rank: int, world: int) -> None:
        """This process holds samples ``rank::world`` of each global batch (DDP): random slices are drawn for
        the global batch and the Locality Loss is normalised by the global count of non-empty masks."""
        self.rank, self.world = rank, world

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """Parameters of both discriminators (for their own optimizer)."""
        return list(self.disc2d.parameters()) + (list(self.disc3d.parameters()) if self.disc3d is not None else [])

    @staticmethod
    def _slice(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One axial slice per sample: (B, C, D, H, W) -> (B, C, H, W) at depth ``idx`` (B,)."""
        return x[torch.arange(x.shape[0], device=x.device), :, idx]

    def _slice_index(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # drawn on the generator's device (CPU by default), then moved: no host sync. Drawn for the global
        # batch and sliced, so each sample gets the slice one process would give it.
        dev = generator.device if generator is not None else "cpu"
        idx = torch.randint(0, x.shape[2], (x.shape[0] * self.world,), generator=generator, device=dev)
        return idx[self.rank :: self.world].to(x.device)

    def _slices(self, x: torch.Tensor, recon: torch.Tensor, generator: torch.Generator | None):
        if self.spatial_dims == 2:
            return x, recon
        idx = self._slice_index(x, generator)
        return self._slice(x, idx), self._slice(recon, idx)

    def generator_loss(self, x: torch.Tensor, out, mask: torch.Tensor, step: int, generator: torch.Generator | None = None):
        """Total generator loss and a dict of detached terms. ``x`` (B, 1, D, H, W) in [0, 1]."""
        recon = out.recon
        logs: dict[str, torch.Tensor] = {}
        l1 = F.l1_loss(recon, x)
        loss = self.l1_weight * l1 + out.commitment_loss
        logs.update(l1=l1.detach(), commitment=out.commitment_loss.detach())
        x2, r2 = self._slices(x, recon, generator)
        if self.perceptual is not None and self.perceptual_weight > 0:
            p = self.perceptual(r2, x2)
            loss = loss + self.perceptual_weight * p
            logs["perceptual"] = p.detach()
        if self.locality_weight > 0:
            loc = locality_loss(x, recon, mask, world=self.world)
            loss = loss + self.locality_weight * loc
            logs["locality"] = loc.detach()
        if step >= self.disc_start:
            f2_fake = self.disc2d(r2)
            with torch.no_grad():
                f2_real = self.disc2d(x2)
            g2 = hinge_g_loss(f2_fake[-1])
            fm = feature_matching_loss(f2_real, f2_fake, self.feature_matching)
            loss = loss + self.disc2d_weight * g2
            logs["g_adv2d"] = g2.detach()
            if self.disc3d is not None:
                f3_fake = self.disc3d(recon)
                with torch.no_grad():
                    f3_real = self.disc3d(x)
                g3 = hinge_g_loss(f3_fake[-1])
                fm = fm + feature_matching_loss(f3_real, f3_fake, self.feature_matching)
                loss = loss + self.disc3d_weight * g3
                logs["g_adv3d"] = g3.detach()
            loss = loss + self.feature_matching_weight * fm
            logs["feature_matching"] = fm.detach()
        logs["total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, out, step: int, generator: torch.Generator | None = None):
        """Hinge loss of both discriminators on real vs detached reconstructions (0 before ``disc_start``)."""
        if step < self.disc_start:
            zero = torch.zeros((), device=x.device)
            return zero, {"d_loss": zero}
        recon = out.recon.detach()
        x2, r2 = self._slices(x, recon, generator)
        d2 = hinge_d_loss(self.disc2d(x2)[-1], self.disc2d(r2)[-1])
        loss = self.disc2d_weight * d2
        logs = {"d2d": d2.detach()}
        if self.disc3d is not None:
            d3 = hinge_d_loss(self.disc3d(x)[-1], self.disc3d(recon)[-1])
            loss = loss + self.disc3d_weight * d3
            logs["d3d"] = d3.detach()
        logs["d_loss"] = loss.detach()
        return loss, logs
