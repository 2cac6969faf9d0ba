"""The Lad sampling pipeline: masks in, CT volumes out (paper section 3.4, Figure 2(c)).

```python
from lad.sampling.pipeline import LadPipeline
pipe = LadPipeline.from_run("runs/demo", device="cpu")
volumes = pipe(masks, seeds=[0, 1], guidance=1.0, sampler="ddim", steps=50)  # (B, 1, D, H, W) in [0, 1]
```

The denoising loop is the ten visible lines of ``__call__``. Every sample draws its noise from its
own generator seeded by its own seed, so a sample does not depend on which batch it was in (this is
what makes sharded and resumed generation equal a single run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lad.utils.log import get_logger, progress

__all__ = ["LadPipeline", "load_run_parts"]

log = get_logger(__name__)


def load_run_parts(run: str | Path, *, device: str | torch.device = "cpu", ema: bool = True) -> dict:
    """Load every trained part of a run folder (docs/contracts.md "Run folder")."""
    from lad.models.condition import ConditionExtractor
    from lad.models.denoiser import LatentDenoiser
    from lad.models.vqgan import VQGAN
    from lad.schedulers import DDPMScheduler
    from lad.training.latents import file_hash

    run = Path(run)
    if not (run / "vqgan").is_dir():
        raise FileNotFoundError(f"{run}: no trained VQ-GAN (run `lad train vqgan --run {run}` first)")
    den_dir = run / ("denoiser_ema" if ema and (run / "denoiser_ema").is_dir() else "denoiser")
    if not den_dir.is_dir():
        raise FileNotFoundError(f"{run}: no trained denoiser (run `lad train diffusion --run {run}` first)")
    stats_path = run / "latent_stats.json"
    if not stats_path.exists():
        raise FileNotFoundError(f"{stats_path}: missing latent scaling (written by `lad train diffusion`)")
    try:
        stats = json.loads(stats_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{stats_path}: corrupt latent scaling ({e}); retrain the diffusion part "
                         f"(lad train diffusion --run {run} --overwrite)") from None
    if stats.get("vqgan_hash") and stats["vqgan_hash"] != file_hash(run / "vqgan" / "model.safetensors"):
        raise ValueError(f"{run / 'vqgan'}: the VQ-GAN changed after the diffusion model was trained on its latents "
                         f"({stats_path} names another VQ-GAN); retrain it: lad train diffusion --run {run} --overwrite")
    parts = {
        "vqgan": VQGAN.from_pretrained(run / "vqgan", map_location=device).to(device).eval(),
        "denoiser": LatentDenoiser.from_pretrained(den_dir, map_location=device).to(device).eval(),
        "scheduler": DDPMScheduler.from_pretrained(run / "scheduler"),
        "latent_stats": stats,
        "condition": None,
        "checkpoint_hash": file_hash(den_dir / "model.safetensors"),
    }
    cond_dir = run / ("condition" if den_dir.name == "denoiser_ema" else "condition_raw")
    if cond_dir.is_dir():  # the EMA extractor goes with the EMA denoiser, the raw one with the raw
        parts["condition"] = ConditionExtractor.from_pretrained(cond_dir, map_location=device).to(device).eval()
    return parts


class LadPipeline:
    """VQ-GAN + Condition Extractor + latent denoiser + scheduler, ready to sample."""

    def __init__(self, *, vqgan, denoiser, scheduler, latent_stats: dict, condition=None, device="cpu", checkpoint_hash: str = ""):
        self.vqgan = vqgan
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.condition = condition
        self.device = torch.device(device)
        self.checkpoint_hash = checkpoint_hash
        self.latent_stats = latent_stats
        self._shift = torch.as_tensor(latent_stats["shift"], dtype=torch.float32, device=self.device)
        self._scale = torch.as_tensor(latent_stats["scale"], dtype=torch.float32, device=self.device)
        self.latent_shape = tuple(latent_stats["latent_shape"])  # (C, d, h, w)
        self.image_shape = tuple(latent_stats["image_shape"])  # (D, H, W)

    @classmethod
    def from_run(cls, run: str | Path, *, device: str | torch.device = "cpu", ema: bool = True) -> "LadPipeline":
        return cls(**load_run_parts(run, device=device, ema=ema), device=device)

    # latent scaling (written by the diffusion trainer): z_scaled = (z - shift) / scale
    def _unscale(self, z: torch.Tensor) -> torch.Tensor:
        view = (1, -1, 1, 1, 1) if self._shift.ndim == 1 else (1,)
        return z * self._scale.view(*view) + self._shift.view(*view)

    @torch.no_grad()
    def conditions(self, masks: torch.Tensor) -> torch.Tensor | None:
        """Condition vectors ``(B, cond_dim)`` for Lad masks ``(B, 1, D, H, W)`` uint8 in {0, 1, 2}."""
        if self.condition is None:
            return None
        from lad.models.condition import encode_mask
        from lad.topology import betti_vectors, normalize_betti

        mask_latent = encode_mask(self.vqgan, masks.to(self.device)) if self.condition.config["use_content"] else None
        betti = None
        if self.condition.config["use_structure"]:
            vec = betti_vectors(masks[:, 0].cpu().numpy())
            betti = torch.as_tensor(normalize_betti(vec), device=self.device)
        return self.condition(mask_latent, betti)

    def spatial(self, masks: torch.Tensor) -> torch.Tensor | None:
        """The spatial condition map ``(B, 2, d, h, w)`` of a denoiser that takes one (ours), else None."""
        if not getattr(self.denoiser, "spatial_channels", 0):
            return None
        from lad.models.condition import spatial_condition

        factors = tuple(s // l for s, l in zip(self.image_shape, self.latent_shape[1:]))
        return spatial_condition(masks.to(self.device), factors)

    # small public pieces for loops other than ``__call__`` (latent inpainting, lad.sampling.inpaint)
    @property
    def latent_factors(self) -> tuple[int, int, int]:
        """The VQ-GAN's down-sampling per axis ``(D/d, H/h, W/w)``."""
        return tuple(s // l for s, l in zip(self.image_shape, self.latent_shape[1:]))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` float in [0, 1] -> the scaled latent ``(B, C, d, h, w)`` the denoiser works on
        (the VQ-GAN's pre-quantisation latent, scaled as in training; ``decode`` inverts it)."""
        view = (1, -1, 1, 1, 1) if self._shift.ndim == 1 else (1,)
        z = self.vqgan.encode(images.to(self.device, torch.float32))
        return (z - self._shift.view(*view)) / self._scale.view(*view)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent ``(B, C, d, h, w)`` -> ``(B, 1, D, H, W)`` float32 in [0, 1], as ``__call__`` decodes."""
        return self.vqgan.decode_latent(self._unscale(z)).clamp(0.0, 1.0)

    def make_scheduler(self, sampler: str):
        """The sampling scheduler of kind ``sampler`` with the run's schedule and x0 clipping (as ``__call__``)."""
        return self._make_scheduler(sampler)

    @torch.no_grad()
    def __call__(
        self,
        masks: torch.Tensor,
        *,
        seeds: Sequence[int],
        guidance: float = 1.0,
        sampler: str = "ddim",
        steps: int = 50,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Generate one CT volume per mask.

        masks: ``(B, 1, D, H, W)`` uint8 in {0, 1, 2} on the model's grid; seeds: one int per sample.
        sampler / steps: the defaults, DDIM with 50 steps, are ours; the paper samples with ``sampler="ddpm",
        steps=300`` (what ``lad sample`` takes from the run's ``sampling`` section for the paper presets).
        Returns ``(B, 1, D, H, W)`` float32 in [0, 1] (HU [-1000, 400]) on the pipeline's device.
        """
        from lad.models.guidance import guided_epsilon

        if masks.ndim != 5 or tuple(masks.shape[2:]) != self.image_shape:
            raise ValueError(f"masks must be (B, 1, {', '.join(map(str, self.image_shape))}), got {tuple(masks.shape)}")
        if len(seeds) != masks.shape[0]:
            raise ValueError(f"need one seed per mask: {len(seeds)} seeds for {masks.shape[0]} masks")
        scheduler = self._make_scheduler(sampler)
        scheduler.set_timesteps(steps)
        gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        cond, spatial = self.conditions(masks), self.spatial(masks)
        null = self.condition.null_cond if self.condition is not None else None
        z = torch.stack([torch.randn(self.latent_shape, generator=g, device=self.device) for g in gens])
        for t in progress(scheduler.timesteps, desc="denoising", leave=False, disable=not show_progress):
            tt = torch.full((z.shape[0],), int(t), device=self.device, dtype=torch.long)
            eps = guided_epsilon(self.denoiser, z, tt, cond, null, guidance_scale=guidance, spatial=spatial)
            z = scheduler.step(eps, t, z, generator=gens)
        recon = self.vqgan.decode_latent(self._unscale(z))
        return recon.clamp(0.0, 1.0)

    def _make_scheduler(self, sampler: str):
        from lad.schedulers import DDIMScheduler, DDPMScheduler

        cfg = dict(self.scheduler.config)
        # Clip each x0 estimate to the training latents' range (diffusers' clip_sample). With the release's
        # cosine schedule alpha_bar(T-1) = 2.7e-8, so the first step's x0 = (z - sqrt(1 - a) eps) / sqrt(a)
        # multiplies the epsilon error by ~6000: without the clip, a demo model trained for 1200 steps
        # (loss 0.15) produced no body outline from pure noise, while noising a real latent to t = 150 and
        # denoising it back was faithful (measured 2026-12-02, docs/sampling.md).
        abs_max = self.latent_stats.get("scaled_abs_max")
        if abs_max is not None and not cfg.get("clip_sample"):
            cfg.update(clip_sample=True, clip_sample_range=float(abs_max))
        if sampler == "ddpm":
            return DDPMScheduler(**cfg)
        if sampler == "ddim":
            return DDIMScheduler(**cfg)
        raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")

    def to_hu(self, volumes: torch.Tensor) -> np.ndarray:
        """[0, 1] volumes -> HU float32 numpy (the inverse of the preprocessing's scaling)."""
        from lad.data.labels import unit_to_hu

        return unit_to_hu(volumes.detach().cpu().numpy())
