"""Sampling the HA-GAN baseline (Sun et al., 2022, "Hierarchical Amortized GAN for 3D High Resolution Medical Image
Synthesis"): noise -> G^A -> G^H on the whole feature volume -> a full-resolution volume.

``HAGANPipeline`` has the interface ``lad.sampling.generate`` uses of ``LadPipeline`` (``image_shape``,
``latent_stats``, ``checkpoint_hash``, ``__call__(masks, seeds=...)``, ``to_hu``), so ``lad sample --run RUN``
writes the same sample folder for an HA-GAN run (``RUN/hagan/``). HA-GAN is unconditional: the masks only fix the
batch size; they are written beside the samples (as for V0) and give the output geometry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["HAGANPipeline", "is_hagan_run"]


def is_hagan_run(run: str | Path) -> bool:
    """True for a run folder holding a trained HA-GAN (``RUN/hagan/``) and no Lad model; a folder holding both is refused."""
    run = Path(run)
    if not (run / "hagan").is_dir():
        return False
    if (run / "vqgan").is_dir() or (run / "denoiser").is_dir():
        raise ValueError(f"{run}: holds both a Lad model (vqgan/, denoiser/) and an HA-GAN (hagan/); keep them in separate "
                         "run folders")
    return True


class HAGANPipeline:
    """A trained HA-GAN generator, ready to sample volumes on the prepared windows' grid."""

    def __init__(self, *, generator, data: dict, device="cpu", checkpoint_hash: str = ""):
        self.generator = generator
        self.device = torch.device(device)
        self.checkpoint_hash = checkpoint_hash
        self.latent_stats = data  # named as LadPipeline's: spacing, organ and fingerprint of the training windows
        self.image_shape = tuple(data["image_shape"])  # (D, H, W) of the windows (the model's may differ: resized back)

    @classmethod
    def from_run(cls, run: str | Path, *, device: str | torch.device = "cpu") -> "HAGANPipeline":
        from lad.models.hagan import HAGANGenerator
        from lad.training.latents import file_hash

        folder = Path(run) / "hagan"
        data_file = folder / "data.json"
        if not (folder / "generator").is_dir() or not data_file.exists():
            raise FileNotFoundError(f"{folder}: no trained HA-GAN (run `lad train hagan --run {run}` to its end)")
        try:
            data = json.loads(data_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{data_file}: corrupt ({e}); retrain: lad train hagan --run {run} --overwrite") from None
        g = HAGANGenerator.from_pretrained(folder / "generator", map_location=device).to(device).eval()
        return cls(generator=g, data=data, device=device, checkpoint_hash=file_hash(folder / "generator" / "model.safetensors"))

    @torch.no_grad()
    def __call__(self, masks: torch.Tensor, *, seeds: Sequence[int], guidance=None, sampler=None, steps=None,
                 show_progress: bool = False) -> torch.Tensor:
        """One volume per mask (unconditional: only ``masks.shape[0]`` is used), from the noise of its own seed.

        masks: ``(B, 1, D, H, W)`` on the windows' grid; ``guidance``, ``sampler``, ``steps``: accepted for the
        pipeline interface and unused (None; ``sampler`` may be "hagan"). Returns ``(B, 1, D, H, W)`` float32 in [0, 1] (HU [-1000, 400]).
        """
        from lad.training.hagan_trainer import to_unit

        if guidance is not None or steps is not None or sampler not in (None, "hagan"):
            raise ValueError("HA-GAN has no sampler, steps or guidance (an unconditional GAN): leave them unset")
        if masks.ndim != 5 or tuple(masks.shape[2:]) != self.image_shape:
            raise ValueError(f"masks must be (B, 1, {', '.join(map(str, self.image_shape))}), got {tuple(masks.shape)}")
        if len(seeds) != masks.shape[0]:
            raise ValueError(f"need one seed per mask: {len(seeds)} seeds for {masks.shape[0]} masks")
        z = torch.stack([torch.randn(self.generator.latent_dim, generator=torch.Generator(device=self.device).manual_seed(int(s)),
                                     device=self.device) for s in seeds])
        return to_unit(self.generator(z), self.image_shape)

    def to_hu(self, volumes: torch.Tensor) -> np.ndarray:
        """[0, 1] volumes -> HU float32 numpy (the inverse of the preprocessing's scaling)."""
        from lad.data.labels import unit_to_hu

        return unit_to_hu(volumes.detach().cpu().numpy())
