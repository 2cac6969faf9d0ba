"""Latent cache for diffusion training: the frozen VQ-GAN encoder runs once per window.

``RUN/latent_cache/`` holds ``latents.safetensors`` (``z`` pre-quantisation image latents, ``mask_z``
encoded masks when the content condition is on, ``betti`` Betti vectors when the structure
condition is on) and ``meta.json`` with the hash of ``RUN/vqgan/model.safetensors`` and of the
dataset manifest: a changed VQ-GAN or dataset invalidates the cache.

Latent scaling (``RUN/latent_stats.json``): per-channel mean and standard deviation of the training
latents, ``z_scaled = (z - shift) / scale`` (unit variance, as MAISI scales by 1/std; the release
min-max scales with the codebook's range, which one outlier code stretches).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lad.utils.atomic import atomic_dir, write_json
from lad.utils.log import get_logger, progress

__all__ = ["file_hash", "build_latent_cache", "latent_stats"]

log = get_logger(__name__)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@torch.no_grad()
def build_latent_cache(run: Path, dataset, vqgan, *, content: bool, structure: bool, device: torch.device,
                       batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Latents of every training window (computed once; reused while the VQ-GAN and data are unchanged)."""
    from lad.models.condition import encode_mask
    from lad.topology import betti_vectors

    cache = run / "latent_cache"
    key = {"vqgan": file_hash(run / "vqgan" / "model.safetensors"), "manifest": file_hash(dataset.path / "manifest.json"),
           "split": dataset.split, "content": content, "structure": structure, "n": len(dataset)}
    if (cache / "meta.json").exists() and json.loads((cache / "meta.json").read_text()) == key:
        log.info("reusing latent cache %s", cache)
        return load_file(str(cache / "latents.safetensors"))
    if cache.exists():
        log.info("latent cache %s is stale (VQ-GAN or data changed): recomputing", cache)
    zs, mzs, bettis = [], [], []
    vqgan = vqgan.to(device).eval()
    for s in progress(range(0, len(dataset), batch_size), desc="encode latents", unit="batch"):
        items = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
        x = torch.from_numpy(np.stack([it["image"] for it in items])).to(device)
        m = np.stack([it["mask"] for it in items])
        zs.append(vqgan.encode(x).cpu())
        if content:
            mzs.append(encode_mask(vqgan, torch.from_numpy(m).to(device)).cpu())
        if structure:
            bettis.append(torch.from_numpy(betti_vectors(m[:, 0])))
    tensors = {"z": torch.cat(zs)}
    if content:
        tensors["mask_z"] = torch.cat(mzs)
    if structure:
        tensors["betti"] = torch.cat(bettis)
    with atomic_dir(cache) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "latents.safetensors"))
        write_json(tmp / "meta.json", key)
    return tensors


def latent_stats(z: torch.Tensor) -> dict:
    """Per-channel shift/scale of latents ``z`` (N, C, d, h, w)."""
    zc = z.transpose(0, 1).reshape(z.shape[1], -1).double()
    return {"method": "per-channel mean/std", "shift": zc.mean(1).tolist(), "scale": zc.std(1).clamp(min=1e-6).tolist()}
