"""Self-supervised episodes: one superpixel is both the support and the query mask, under two augmentations.

Augmentations (Ouyang et al.'s geometric + intensity set) are written in torch as one ``grid_sample``
per image: a random affine (rotation, shear, scale, shift) composed with a smooth elastic displacement
(Gaussian-filtered noise), then a random gamma and contrast/brightness. Parameters are drawn from an
explicit generator (``draw_augmentation``) and applied by a deterministic twin (``apply_augmentation``),
so each episode replays exactly from ``(seed, step, index)``. (MONAI's ``Rand2DElastic`` +
``RandAffine`` do the same in two resamplings and through the global MONAI random state; one fused
resampling is both faster and seedable per episode.)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from lad.downstream.ssl.data import SlicePool
from lad.utils.seed import derive_seed

__all__ = ["EpisodeAugmentConfig", "draw_augmentation", "apply_augmentation", "make_episode_batch"]


@dataclasses.dataclass
class EpisodeAugmentConfig:
    """Ranges of the random augmentation (Ouyang et al.'s abdominal settings by default)."""

    rotate_deg: float = 5.0
    shear_deg: float = 5.0
    scale: tuple[float, float] = (0.9, 1.2)
    shift: float = 0.05          # fraction of the image size
    elastic_alpha: float = 10.0  # displacement magnitude in pixels (before smoothing normalisation)
    elastic_sigma: float = 5.0   # Gaussian smoothing of the displacement, pixels
    gamma: tuple[float, float] = (0.5, 1.5)
    contrast: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.05


def _smooth(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of (C, H, W) noise, reflect padding."""
    if sigma <= 0:
        return noise
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=noise.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = noise.shape[0]
    out = noise[None]
    pad_h = min(r, noise.shape[1] - 1)
    pad_w = min(r, noise.shape[2] - 1)
    out = F.pad(out, (0, 0, pad_h, pad_h), mode="reflect") if pad_h > 0 else out
    out = F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)[:, :, r - pad_h : r + pad_h + 1], groups=c)
    out = F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w > 0 else out
    out = F.conv2d(out, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)[:, :, :, r - pad_w : r + pad_w + 1], groups=c)
    return out[0]


def draw_augmentation(gen: torch.Generator, size: int, cfg: EpisodeAugmentConfig) -> dict[str, torch.Tensor]:
    """Random parameters for one image of ``size`` x ``size``: ``theta`` (2, 3) affine in normalised
    coordinates, ``flow`` (H, W, 2) elastic displacement (normalised units), ``gamma``, ``contrast``, ``brightness``."""
    def u(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=gen))

    rot = math.radians(u(-cfg.rotate_deg, cfg.rotate_deg))
    shear = math.radians(u(-cfg.shear_deg, cfg.shear_deg))
    s = u(*cfg.scale)
    tx, ty = u(-cfg.shift, cfg.shift) * 2, u(-cfg.shift, cfg.shift) * 2
    # output -> input sampling: zoom in by s means sampling a 1/s smaller region
    a = torch.tensor([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]]) @ torch.tensor([[1.0, math.tan(shear)], [0.0, 1.0]]) / s
    theta = torch.cat([a, torch.tensor([[tx], [ty]])], dim=1).float()
    noise = torch.rand((2, size, size), generator=gen) * 2 - 1
    flow = _smooth(noise, cfg.elastic_sigma)
    flow = flow / flow.abs().amax().clamp_min(1e-6) * (cfg.elastic_alpha / max(size, 1)) * 2 * torch.rand((), generator=gen)
    return {"theta": theta, "flow": flow.permute(1, 2, 0).contiguous(), "gamma": torch.tensor(u(*cfg.gamma)),
            "contrast": torch.tensor(u(*cfg.contrast)), "brightness": torch.tensor(u(-cfg.brightness, cfg.brightness))}


def apply_augmentation(image: torch.Tensor, mask: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic twin of :func:`draw_augmentation`: ``image`` (H, W) float in [0, 1], ``mask`` (H, W) float {0, 1}
    -> augmented (image (H, W) float in [0, 1], mask (H, W) float {0, 1}); one resampling (bilinear / nearest)."""
    h, w = image.shape
    grid = F.affine_grid(params["theta"][None], [1, 1, h, w], align_corners=False) + params["flow"][None]
    img = F.grid_sample(image[None, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    msk = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
    img = img.clamp(0, 1) ** params["gamma"]
    img = ((img - 0.5) * params["contrast"] + 0.5 + params["brightness"]).clamp(0, 1)
    return img, msk


def make_episode_batch(pools: dict[str, SlicePool], *, batch_size: int, seed: int, step: int, synthetic_fraction: float,
                       augment: EpisodeAugmentConfig, min_pixels: int = 4, tries: int = 10) -> dict[str, torch.Tensor]:
    """The ``batch_size`` self-supervised episodes of training step ``step`` (a pure function of its arguments).

    ``pools``: ``{"real": pool, "synthetic": pool}`` (either may be absent). Each episode picks a source
    (synthetic with probability ``synthetic_fraction`` when both exist), a slice, a superpixel, and two
    augmentations; it redraws (up to ``tries`` times) when the augmented query mask has fewer than
    ``min_pixels`` pixels. Returns ``support_image``/``query_image`` (B, 1, S, S) float in [0, 1],
    ``support_mask`` (B, S, S) float {0, 1}, ``query_label`` (B, S, S) int64 {0, 1}.
    """
    names = [n for n in ("real", "synthetic") if n in pools and len(pools[n].indices(n))]
    if not names:
        raise ValueError("no training slices with superpixels (is the body mask empty? check the data and the preset's min_size)")
    out: dict[str, list[torch.Tensor]] = {"support_image": [], "support_mask": [], "query_image": [], "query_label": []}
    for b in range(batch_size):
        rng = np.random.default_rng(derive_seed(seed, "ssl-episode", step, b))
        gen = torch.Generator().manual_seed(derive_seed(seed, "ssl-augment", step, b))
        for _ in range(tries):
            if len(names) == 2:
                src = "synthetic" if rng.random() < synthetic_fraction else "real"
            else:
                src = names[0]
            pool = pools[src]
            i = int(rng.choice(pool.indices(src)))
            label = int(rng.integers(1, int(pool.counts[i]) + 1))
            img = torch.from_numpy(pool.images[i].astype(np.float32))
            m = torch.from_numpy((pool.superpixels[i] == label).astype(np.float32))
            s_img, s_m = apply_augmentation(img, m, draw_augmentation(gen, img.shape[-1], augment))
            q_img, q_m = apply_augmentation(img, m, draw_augmentation(gen, img.shape[-1], augment))
            if s_m.sum() >= min_pixels and q_m.sum() >= min_pixels:
                break
        out["support_image"].append(s_img[None])
        out["support_mask"].append(s_m)
        out["query_image"].append(q_img[None])
        out["query_label"].append(q_m.long())
    return {k: torch.stack(v) for k, v in out.items()}
