"""Latent cache for diffusion training: the frozen VQ-GAN encoder runs once per window.

``RUN/latent_cache/`` holds ``latents.safetensors`` (``z`` pre-quantisation image latents, ``mask_z``
encoded masks when the content condition is on, ``betti`` Betti vectors when the structure
condition is on, ``mask_lr`` the spatial condition map when the denoiser takes one) and ``meta.json`` with the hash of ``RUN/vqgan/model.safetensors`` and of the
dataset manifest (``data_key``: of the items of a Dataset object): a changed VQ-GAN or dataset invalidates the cache.

Latent scaling (``LatentScaler``, saved as ``RUN/latent_stats.json``): per-channel mean and standard deviation
of the training latents, ``z_scaled = (z - shift) / scale`` (unit variance, as MAISI scales by 1/std; the release
min-max scales with the codebook's range, which one outlier code stretches). The one object training, sampling
and export use.

Under torch.distributed (``torchrun``) every rank encodes the windows ``rank::world`` and writes them to
``RUN/latent_cache.parts/``; rank 0 merges the parts into the cache, and all ranks then read it (the run
folder must be on a filesystem all nodes see, as for checkpoints). The result is the single-process cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lad.utils.atomic import atomic_dir, write_json
from lad.utils.distributed import barrier, broadcast_object, get_rank, get_world_size
from lad.utils.log import get_logger, is_main_process, progress

__all__ = ["file_hash", "data_key", "build_latent_cache", "LatentScaler"]

log = get_logger(__name__)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def data_key(dataset, *, progress_bar: bool = True) -> dict:
    """What identifies the training windows in the cache's key: a prepared dataset's manifest hash and split; a
    Dataset object's ``cache_key`` attribute when it has one, else a hash of every item's image and mask (read once)."""
    from lad.data.dataset import PreparedDataset

    if isinstance(dataset, PreparedDataset):
        return {"manifest": file_hash(dataset.path / "manifest.json"), "split": dataset.split}
    key = getattr(dataset, "cache_key", None)
    if key is None:
        h = hashlib.sha256()
        for i in progress(range(len(dataset)), desc="hash data", unit="window", disable=not progress_bar):
            item = dataset[i]
            for name in ("image", "mask"):
                a = np.ascontiguousarray(item[name])
                h.update(f"{name}{a.dtype}{a.shape}".encode())
                h.update(a.tobytes())
        key = h.hexdigest()[:16]
    return {"data": str(key)}


@torch.no_grad()
def build_latent_cache(run: Path, dataset, vqgan, *, content: bool, structure: bool, device: torch.device,
                       batch_size: int = 4, spatial: tuple[int, int, int] | None = None,
                       progress_bar: bool = True) -> dict[str, torch.Tensor]:
    """Latents of every training window (computed once; reused while the VQ-GAN and data are unchanged).
    ``spatial``: the VQ-GAN's down-sampling factors when the spatial condition map is needed, else None."""
    from lad.models.condition import encode_mask, spatial_condition
    from lad.topology import betti_vectors

    cache = run / "latent_cache"
    key = {"vqgan": file_hash(run / "vqgan" / "model.safetensors"), **data_key(dataset, progress_bar=progress_bar), "content": content,
           "structure": structure, "n": len(dataset)}
    if spatial is not None:  # (only then: the caches of runs without it stay valid)
        key["spatial"] = list(spatial)
    valid = (cache / "meta.json").exists() and json.loads((cache / "meta.json").read_text()) == key
    if broadcast_object(valid):  # rank 0 decides for everyone
        log.info("reusing latent cache %s", cache)
        return load_file(str(cache / "latents.safetensors"))
    if cache.exists():
        log.info("latent cache %s is stale (VQ-GAN or data changed): recomputing", cache)
    rank, world = get_rank(), get_world_size()
    mine = list(range(rank, len(dataset), world))
    zs, mzs, bettis, lrs = [], [], [], []
    vqgan = vqgan.to(device).eval()
    for s in progress(range(0, len(mine), batch_size), desc="encode latents", unit="batch", disable=not progress_bar):
        items = [dataset[i] for i in mine[s : s + batch_size]]
        x = torch.from_numpy(np.stack([it["image"] for it in items])).to(device)
        m = np.stack([it["mask"] for it in items])
        zs.append(vqgan.encode(x).cpu())
        if content:
            mzs.append(encode_mask(vqgan, torch.from_numpy(m).to(device)).cpu())
        if structure:
            bettis.append(torch.from_numpy(betti_vectors(m[:, 0])))
        if spatial is not None:
            lrs.append(spatial_condition(torch.from_numpy(m), spatial))
    tensors = {}
    if mine:  # (a rank gets no window when there are fewer windows than processes)
        tensors["z"] = torch.cat(zs)
        if content:
            tensors["mask_z"] = torch.cat(mzs)
        if structure:
            tensors["betti"] = torch.cat(bettis)
        if spatial is not None:
            tensors["mask_lr"] = torch.cat(lrs)
    if world > 1:
        tensors = _merge_parts(run, tensors, rank, world, len(dataset))
    if is_main_process():
        with atomic_dir(cache) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "latents.safetensors"))
            write_json(tmp / "meta.json", key)
    if world > 1:
        barrier()
        if is_main_process():
            shutil.rmtree(run / "latent_cache.parts", ignore_errors=True)
        return load_file(str(cache / "latents.safetensors"))
    return tensors


def _merge_parts(run: Path, part: dict[str, torch.Tensor], rank: int, world: int, n: int) -> dict[str, torch.Tensor]:
    """Every rank writes its windows ``rank::world``; rank 0 reads all parts back in window order."""
    folder = run / "latent_cache.parts"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank_{rank}.tmp"
    save_file({k: v.contiguous() for k, v in part.items()}, str(tmp))
    tmp.rename(folder / f"rank_{rank}.safetensors")
    barrier()
    if not is_main_process():
        return part
    parts = [load_file(str(folder / f"rank_{r}.safetensors")) for r in range(world)]
    out = {}
    for k, v in part.items():  # rank 0's part: it has at least one window
        full = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
        for r in range(world):
            if r < n:
                full[r::world] = parts[r][k]
        out[k] = full
    return out


class LatentScaler:
    """Per-channel latent scaling: ``scale(z) = (z - shift) / scale``, ``unscale`` its inverse.

    ``shift`` / ``scale``: ``(C,)`` (or scalars, for a run saved that way), kept in float64 exactly as fitted or
    read from ``latent_stats.json`` and cast to the latent's dtype when applied (float32 latents get the float32
    rounding of those values, which is what training and sampling always used). ``scaled_abs_max``: the largest
    ``|scaled latent|`` of the training set, the sampler's x0 clip (None: a run saved without it samples unclipped).
    """

    METHOD = "per-channel mean/std"

    def __init__(self, shift, scale, *, scaled_abs_max: float | None = None, method: str = METHOD):
        self.shift = torch.as_tensor(shift, dtype=torch.float64)
        self.scale_factor = torch.as_tensor(scale, dtype=torch.float64)
        if self.shift.shape != self.scale_factor.shape or self.shift.ndim > 1:
            raise ValueError(f"latent shift and scale must be two equal-length lists (one value per channel), got shapes "
                             f"{tuple(self.shift.shape)} and {tuple(self.scale_factor.shape)}")
        if not bool(torch.isfinite(self.shift).all()) or not bool((self.scale_factor > 0).all()):
            raise ValueError("latent shift must be finite and scale > 0")
        self.scaled_abs_max = None if scaled_abs_max is None else float(scaled_abs_max)
        self.method = method
        self._cast: dict = {}  # (which, device, dtype) -> the statistics shaped for a (B, C, ...) latent

    @classmethod
    def fit(cls, z: torch.Tensor) -> "LatentScaler":
        """Per-channel mean and standard deviation (clamped at 1e-6) of latents ``z`` ``(N, C, d, h, w)``, in float64."""
        if z.ndim != 5:
            raise ValueError(f"latents must be (N, C, d, h, w), got shape {tuple(z.shape)}")
        zc = z.transpose(0, 1).reshape(z.shape[1], -1).double()
        mean, std = zc.mean(1), zc.std(1).clamp(min=1e-6)
        abs_max = float(((zc - mean[:, None]) / std[:, None]).abs().max())
        return cls(mean, std, scaled_abs_max=abs_max)

    def _view(self, which: str, z: torch.Tensor) -> torch.Tensor:
        key = (which, z.device, z.dtype, z.ndim)
        if key not in self._cast:
            t = getattr(self, which).to(device=z.device, dtype=z.dtype)
            self._cast[key] = t.view(1, -1, *([1] * (z.ndim - 2))) if t.ndim == 1 else t
        return self._cast[key]

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - shift) / scale`` over the channel axis (dim 1) of ``z`` ``(B, C, ...)``."""
        return (z - self._view("shift", z)) / self._view("scale_factor", z)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """``z * scale + shift``: scaled latents back to the VQ-GAN's latent space."""
        return z * self._view("scale_factor", z) + self._view("shift", z)

    def to(self, device: str | torch.device) -> "LatentScaler":
        """Move the statistics to ``device`` (in place); returns self."""
        self.shift, self.scale_factor = self.shift.to(device), self.scale_factor.to(device)
        self._cast.clear()
        return self

    def to_dict(self) -> dict:
        """The ``latent_stats.json`` keys of the scaling: ``method``, ``shift``, ``scale``, ``scaled_abs_max``."""
        return {"method": self.method, "shift": self.shift.cpu().tolist(), "scale": self.scale_factor.cpu().tolist(),
                "scaled_abs_max": self.scaled_abs_max}

    @classmethod
    def from_dict(cls, stats: dict, *, source: str = "latent stats") -> "LatentScaler":
        """The scaler of a ``latent_stats.json`` mapping (other keys, e.g. ``latent_shape``, are ignored)."""
        missing = [k for k in ("shift", "scale") if k not in stats]
        if missing:
            raise ValueError(f"{source}: missing {missing} (the latent scaling written by `lad train diffusion`)")
        return cls(stats["shift"], stats["scale"], scaled_abs_max=stats.get("scaled_abs_max"),
                   method=stats.get("method", cls.METHOD))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatentScaler):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LatentScaler(channels={self.shift.numel()}, scaled_abs_max={self.scaled_abs_max})"

