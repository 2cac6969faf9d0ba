"""Volumes for SSL-ALPNet: training slices with superpixels, labeled test scans.

* ``original_scans``: the whole original CT volumes of a prepared split with their organ labels, re-read
  through the prepare manifest (``lad.data.originals``) on the prepared grid: the test scans of the 1-shot
  evaluation (paper section 4.3: whole held-out scans with liver, kidney, spleen and pancreas labels).
* ``prepared_scans``: a prepared dataset's windows re-assembled into one volume per patient (windows
  overlap along z; ``meta["z_range"]`` places them); a patient whose windows leave a gap in z gives one
  scan per contiguous run. Training images; test scans only with ``--test-scans windows``.
* ``synthetic_records`` / ``iter_synthetic_scans``: the volumes of a ``lad sample`` folder, read one at a time.
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

__all__ = ["Scan", "SlicePool", "TEST_ORGANS", "organ_binary", "original_scans", "prepared_scans", "iter_prepared_scans",
           "synthetic_records", "iter_synthetic_scans", "synthetic_scans", "resize_volume", "build_slice_pool"]

log = get_logger(__name__)

TEST_ORGANS = ("liver", "kidney", "spleen", "pancreas")


@dataclasses.dataclass
class Scan:
    """One volume: ``image`` (D, H, W) float32 (float16 for original test scans) in [0, 1] (HU [-1000, 400]);
    ``organs`` (D, H, W) uint8 organ label map (0 bg, 1 liver, 2 kidney, 3 spleen, 4 pancreas, 5 tumour) or None (unlabeled)."""

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


def original_scans(data: str | Path, split: str, organs: Iterable[str] = TEST_ORGANS) -> Iterator[Scan]:
    """The whole original CT volume of every patient of ``split`` (sorted by id) with its organ labels, on the
    prepared grid (``lad.data.originals.read_original_case``), one at a time.

    Only the slices between the first and the last slice holding any of ``organs`` are kept: the 1-shot
    protocol scores slices inside each organ's z-range and takes its support slices there, so nothing it
    reads is dropped, and 200 whole scans at 256 x 256 fit in memory (images float16). Raises
    ``lad.data.originals.OriginalCaseError`` naming the file when an original case is not where the
    manifest says."""
    from lad.data.dataset import PreparedDataset
    from lad.data.labels import hu_to_unit
    from lad.data.originals import read_original_case

    organs = list(organs)
    ds = PreparedDataset(data, split=split)
    for pid in sorted({w["patient"] for w in ds.windows}):
        case = read_original_case(data, pid)
        has = np.zeros(len(case.organs), bool)
        for o in organs:
            has |= organ_binary(case.organs, o).reshape(len(has), -1).any(axis=1)
        z = np.flatnonzero(has)
        z0, z1 = (int(z[0]), int(z[-1]) + 1) if len(z) else (0, len(has))
        yield Scan(id=pid, image=hu_to_unit(case.hu[z0:z1]).astype(np.float16), organs=np.ascontiguousarray(case.organs[z0:z1]))


def synthetic_records(folder: str | Path) -> list[tuple[str, Path]]:
    """``(sample id, CT file)`` of every finished sample of a ``lad sample`` folder, in manifest order."""
    from lad.sampling.writer import finished_samples

    return [(str(rec.get("id", f"synthetic_{n:06d}")), files["ct"]) for n, (rec, files) in enumerate(finished_samples(folder))]


def iter_synthetic_scans(records: Iterable[tuple[str, Path]]) -> Iterator[Scan]:
    """Unlabeled scans of synthetic samples (``synthetic_records`` entries), read one at a time (int16 HU,
    NIfTI or .npy, canonical orientation). Their conditioning masks only label the organ of interest and the
    tumour, so they are never used as organ labels."""
    import SimpleITK as sitk

    from lad.data.io import canonicalize, read_image
    from lad.data.labels import hu_to_unit

    for sid, ct in records:
        hu = np.load(ct) if ct.suffix == ".npy" else sitk.GetArrayFromImage(canonicalize(read_image(ct)))
        yield Scan(id=sid, image=hu_to_unit(hu))


def synthetic_scans(folder: str | Path) -> list[Scan]:
    """Every volume of a ``lad sample`` output folder (unlabeled), in manifest order."""
    return list(iter_synthetic_scans(synthetic_records(folder)))


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
    the body), ``counts`` (N,) number of superpixels per slice, ``sources`` (N,) ``"real"``/``"synthetic"``,
    ``scans`` (N,) the position of each slice's volume in the scans the pool was built from (None: unknown)."""

    images: np.ndarray
    superpixels: np.ndarray
    counts: np.ndarray
    sources: np.ndarray
    scans: np.ndarray | None = None

    def indices(self, source: str) -> np.ndarray:
        return np.flatnonzero((self.sources == source) & (self.counts > 0))

    def subset(self, keep: np.ndarray) -> "SlicePool":
        return SlicePool(self.images[keep], self.superpixels[keep], self.counts[keep], self.sources[keep],
                         None if self.scans is None else self.scans[keep])

    def first_scans(self, n: int) -> "SlicePool":
        """The slices of the first ``n`` scans the pool was built from (a set of ``n`` volumes)."""
        if self.scans is None:
            raise ValueError("this pool does not record which scan each slice comes from")
        return self.subset(self.scans < n)


def build_slice_pool(scans: Iterable[Scan], source: str, *, size: int, min_size: int, sigma: float, scale: float = 1.0,
                     threshold_hu: float = -500.0, min_body_fraction: float = 0.05,
                     progress_bar: bool = True) -> tuple[SlicePool, np.ndarray | None]:
    """Slices of ``scans`` at ``size`` x ``size`` with their superpixels; slices with less than
    ``min_body_fraction`` body are dropped. Returns the pool and the organ labels of its slices
    ((N, S, S) uint8, nearest-resized; None when the scans are unlabeled), used by setting 2."""
    images, sps, counts, organs, scan_of = [], [], [], [], []
    for k, scan in enumerate(progress(scans, desc=f"superpixels ({source})", unit="scan", disable=not progress_bar)):
        img = resize_volume(scan.image, size)
        lab, body = volume_superpixels(img, min_size=min_size, sigma=sigma, scale=scale, threshold_hu=threshold_hu)
        keep = body.mean(axis=(1, 2)) >= min_body_fraction
        # compact storage (paper scale: ~50k slices of 256 x 256 at 4 bytes per pixel, ~13 GB): float16 keeps
        # [0, 1] images to ~0.7 HU; superpixel ids fit in uint16 unless min_size is tiny
        images.append(img[keep].astype(np.float16))
        sps.append(lab[keep].astype(np.uint16) if lab.max(initial=0) < 65536 else lab[keep])
        counts.append(lab[keep].reshape(int(keep.sum()), -1).max(axis=1, initial=0))
        scan_of.append(np.full(int(keep.sum()), k, np.int32))
        if scan.organs is not None:
            organs.append(resize_volume(scan.organs, size, labels=True)[keep])
    if not images:
        empty = np.zeros((0, size, size))
        return SlicePool(empty.astype(np.float32), empty.astype(np.int32), np.zeros(0, int), np.zeros(0, "<U9"),
                         np.zeros(0, np.int32)), None
    pool = SlicePool(np.concatenate(images), np.concatenate(sps), np.concatenate(counts),
                     np.full(sum(len(i) for i in images), source, dtype="<U9"), np.concatenate(scan_of))
    labels = np.concatenate(organs) if len(organs) == len(images) else None
    log.info("%s: %d slices with %.1f superpixels each on average", source, len(pool.counts), float(pool.counts.mean()) if len(pool.counts) else 0.0)
    return pool, labels
