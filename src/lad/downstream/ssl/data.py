"""Volumes for SSL-ALPNet: training slices with superpixels, labeled test scans.

* ``prepared_scans``: a prepared dataset's windows re-assembled into one volume per patient (windows
  overlap along z; ``meta["z_range"]`` places them); a patient whose windows leave a gap in z gives one
  scan per contiguous run.
* ``synthetic_scans``: the volumes of a ``lad sample`` folder (``lad.evaluation.evaluate.load_synthetic``).
* ``build_slice_pool``: every axial slice resized to the network's input size, with its superpixels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from lad.data.labels import ORGAN_LABELS, TUMOR_LABEL
from lad.downstream.ssl.superpixels import volume_superpixels
from lad.utils.log import get_logger, progress

__all__ = ["Scan", "SlicePool", "TEST_ORGANS", "organ_binary", "prepared_scans", "iter_prepared_scans", "synthetic_scans", "resize_volume",
           "build_slice_pool"]

log = get_logger(__name__)

TEST_ORGANS = ("liver", "kidney", "spleen", "pancreas")


@dataclasses.dataclass
class Scan:
    """One volume: ``image`` (D, H, W) float32 in [0, 1] (HU [-1000, 400]); ``organs`` (D, H, W) uint8 organ
    label map (0 bg, 1 liver, 2 kidney, 3 spleen, 4 pancreas, 5 tumour) or None (unlabeled)."""

    id: str
    image: np.ndarray
    organs: np.ndarray | None = None


def organ_binary(organs: np.ndarray, organ: str) -> np.ndarray:
    """Binary mask of ``organ`` from an organ label map; the pancreas includes its (pancreatic) tumour."""
    if organ not in TEST_ORGANS:
        raise ValueError(f"organ must be one of {list(TEST_ORGANS)}, got {organ!r}")
    m = organs == ORGAN_LABELS[organ]
    if organ == "pancreas":
        m |= organs == TUMOR_LABEL
    return m


def prepared_scans(data: str | Path, split: str) -> list[Scan]:
    """One scan per patient (per contiguous z run) of ``split`` of a prepared dataset, sorted by patient id."""
    return list(iter_prepared_scans(data, split))


def iter_prepared_scans(data: str | Path, split: str) -> Iterator[Scan]:
    """:func:`prepared_scans` one scan at a time (the training pool is built without holding every volume)."""
    from lad.data.dataset import PreparedDataset

    ds = PreparedDataset(data, split=split)
    by_patient: dict[str, list[int]] = {}
    for i, w in enumerate(ds.windows):
        by_patient.setdefault(w["patient"], []).append(i)
    for pid in sorted(by_patient):
        idx = sorted(by_patient[pid], key=lambda i: ds.windows[i]["z_range"][0])
        runs: list[list[int]] = []
        for i in idx:
            z0 = ds.windows[i]["z_range"][0]
            if runs and z0 <= ds.windows[runs[-1][-1]]["z_range"][1]:
                runs[-1].append(i)
            else:
                runs.append([i])
        for r, run in enumerate(runs):
            z_start = ds.windows[run[0]]["z_range"][0]
            z_end = max(ds.windows[i]["z_range"][1] for i in run)
            img = np.zeros((z_end - z_start, *ds.shape[1:]), np.float32)
            org = np.zeros((z_end - z_start, *ds.shape[1:]), np.uint8)
            for i in run:
                item = ds[i]
                z0, z1 = ds.windows[i]["z_range"]
                img[z0 - z_start : z1 - z_start] = item["image"][0]
                org[z0 - z_start : z1 - z_start] = item["organs"][0]
            yield Scan(id=pid if len(runs) == 1 else f"{pid}_part{r}", image=img, organs=org)


def synthetic_scans(folder: str | Path) -> list[Scan]:
    """The volumes of a ``lad sample`` output folder (unlabeled for SSL: their masks only label the organ of
    interest and the tumour, so they are not used as organ labels)."""
    from lad.evaluation.evaluate import load_synthetic

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: synthetic sample folder does not exist")
    vols, _ = load_synthetic(folder)
    return [Scan(id=f"synthetic_{i:06d}", image=v[0].astype(np.float32)) for i, v in enumerate(vols)]


def resize_volume(vol: np.ndarray, size: int, *, labels: bool = False) -> np.ndarray:
    """Resize every axial slice of ``vol`` (D, H, W) to (size, size): bilinear for images, nearest for labels."""
    if vol.shape[1:] == (size, size):
        return vol
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[:, None]
    if labels:
        out = F.interpolate(t, size=(size, size), mode="nearest")[:, 0].numpy().astype(vol.dtype)
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    return out


@dataclasses.dataclass
class SlicePool:
    """Training slices: ``images`` (N, S, S) float16/32 in [0, 1], ``superpixels`` (N, S, S) uint16/int32 (0 = outside
    the body), ``counts`` (N,) number of superpixels per slice, ``sources`` (N,) ``"real"``/``"synthetic"``."""

    images: np.ndarray
    superpixels: np.ndarray
    counts: np.ndarray
    sources: np.ndarray

    def indices(self, source: str) -> np.ndarray:
        return np.flatnonzero((self.sources == source) & (self.counts > 0))

    def subset(self, keep: np.ndarray) -> "SlicePool":
        return SlicePool(self.images[keep], self.superpixels[keep], self.counts[keep], self.sources[keep])


def build_slice_pool(scans: Iterable[Scan], source: str, *, size: int, min_size: int, sigma: float, scale: float = 1.0,
                     threshold_hu: float = -500.0, min_body_fraction: float = 0.05) -> tuple[SlicePool, np.ndarray | None]:
    """Slices of ``scans`` at ``size`` x ``size`` with their superpixels; slices with less than
    ``min_body_fraction`` body are dropped. Returns the pool and the organ labels of its slices
    ((N, S, S) uint8, nearest-resized; None when the scans are unlabeled), used by setting 2."""
    images, sps, counts, organs = [], [], [], []
    for scan in progress(scans, desc=f"superpixels ({source})", unit="scan"):
        img = resize_volume(scan.image, size)
        lab, body = volume_superpixels(img, min_size=min_size, sigma=sigma, scale=scale, threshold_hu=threshold_hu)
        keep = body.mean(axis=(1, 2)) >= min_body_fraction
        # compact storage (paper scale: ~50k slices of 256 x 256 at 4 bytes per pixel, ~13 GB): float16 keeps
        # [0, 1] images to ~0.7 HU; superpixel ids fit in uint16 unless min_size is tiny
        images.append(img[keep].astype(np.float16))
        sps.append(lab[keep].astype(np.uint16) if lab.max(initial=0) < 65536 else lab[keep])
        counts.append(lab[keep].reshape(int(keep.sum()), -1).max(axis=1, initial=0))
        if scan.organs is not None:
            organs.append(resize_volume(scan.organs, size, labels=True)[keep])
    if not images:
        empty = np.zeros((0, size, size))
        return SlicePool(empty.astype(np.float32), empty.astype(np.int32), np.zeros(0, int), np.zeros(0, "<U9")), None
    pool = SlicePool(np.concatenate(images), np.concatenate(sps), np.concatenate(counts),
                     np.full(sum(len(i) for i in images), source, dtype="<U9"))
    labels = np.concatenate(organs) if len(organs) == len(images) else None
    log.info("%s: %d slices with %.1f superpixels each on average", source, len(pool.counts), float(pool.counts.mean()) if len(pool.counts) else 0.0)
    return pool, labels
