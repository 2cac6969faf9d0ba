"""Training and test data of the supervised track: real prepared windows, synthetic samples, stitched test patients.

Intensities follow the tumour-scaling paper: HU clipped to ``hu_window`` ([-175, 250]) and scaled to
[0, 1]. Labels are the Lad mask (0 background, 1 organ of interest, 2 tumour); a synthetic volume's
label is its conditioning mask. Real HU come raw (int16) from the prepared arrays; synthetic HU
from the sample files (int16 HU, NIfTI or .npy), so neither passes through the [-1000, 400] scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lad.utils.log import get_logger

__all__ = ["apply_hu_window", "axis_spacing", "SegItem", "real_items", "SyntheticSample", "load_synthetic_samples",
           "TestPatient", "stitch_test_patients", "order_patients"]

log = get_logger(__name__)


def apply_hu_window(hu: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """HU -> [0, 1] float32: clip to ``window`` (lo, hi) and scale linearly."""
    lo, hi = float(window[0]), float(window[1])
    return ((np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


def axis_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes ``(D, H, W)`` of a ``(d, h, w, 1) -> RAS`` affine."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(a, axis=0))


@dataclass
class SegItem:
    """One training volume, loaded on demand: ``load(window) -> (image (1, D, H, W) float32 in [0, 1], label (1, D, H, W) uint8)``."""

    id: str
    kind: str  # "real" | "synthetic"
    source: object = field(repr=False)
    index: int | str = 0

    def load(self, window: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "real":
            r = self.source.get_arrays(int(self.index), organs=False)
            hu, mask = r["hu"], r["mask"]
        else:
            hu, mask = self.source.read()
        return apply_hu_window(hu, window)[None], np.asarray(mask, dtype=np.uint8)[None]


def order_patients(ds, seed: int) -> list[str]:
    """Training patients in a seeded random order; a size-n subset is the first n (nested subsets)."""
    patients = sorted({w["patient"] for w in ds.windows})
    rng = np.random.default_rng([int(seed), 6])
    return [patients[i] for i in rng.permutation(len(patients))]


def real_items(ds, patients: Sequence[str]) -> list[SegItem]:
    """The windows of ``patients`` in ``ds`` (a ``PreparedDataset``) as training items."""
    chosen = set(patients)
    return [SegItem(id=w["id"], kind="real", source=ds, index=i) for i, w in enumerate(ds.windows) if w["patient"] in chosen]


@dataclass
class SyntheticSample:
    """One finished sample of a ``lad sample`` folder: files, and the window its condition came from."""

    id: str
    ct: Path
    mask: Path
    source_id: str | None
    source_path: str | None

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """``(hu int16 (D, H, W), mask uint8 (D, H, W))`` in the canonical orientation."""
        hu, mask, _ = _read_pair(self.ct, self.mask)
        return hu, mask


def _read_pair(ct: Path, mask: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float] | None]:
    if ct.suffix == ".npy":
        from lad.data.io import load_npy

        return load_npy(ct), load_npy(mask), None  # public-release style arrays carry no geometry
    import SimpleITK as sitk

    from lad.data.io import affine_dhw_to_ras, read_pair

    img, msk = read_pair(ct, mask)
    return sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(msk), axis_spacing(affine_dhw_to_ras(msk))


def load_synthetic_samples(folder: str | Path, *, shape: Sequence[int], spacing: Sequence[float]) -> list[SyntheticSample]:
    """Read and check every finished sample of a ``lad sample`` folder against the real windows' grid.

    ``shape``: the prepared windows' ``(D, H, W)``; ``spacing``: their mm per array axis. Raises
    ``FileNotFoundError`` for a missing folder or manifest, ``ValueError`` for a sample on another grid
    (shape or spacing), mask labels outside {0, 1, 2}, or an empty folder.
    """
    from lad.sampling.writer import finished_samples

    out = []
    for rec, files in finished_samples(folder, ("ct", "mask")):
        ct, mk = files["ct"], files["mask"]
        hu, m, sp = _read_pair(ct, mk)
        if tuple(hu.shape) != tuple(shape) or tuple(m.shape) != tuple(shape):
            raise ValueError(f"{mk}: synthetic volume/mask of shape {tuple(m.shape)} (CT {tuple(hu.shape)}), but the real "
                             f"windows are {tuple(shape)}: the samples are on a different grid (sample from this prepared dataset)")
        if sp is not None and not np.allclose(sp, spacing, rtol=1e-3, atol=1e-3):
            raise ValueError(f"{mk}: synthetic mask spacing {tuple(round(s, 4) for s in sp)} mm (D, H, W), but the real windows "
                             f"have {tuple(round(float(s), 4) for s in spacing)} mm: the samples are on a different grid")
        top = int(m.max(initial=0))
        if top > 2 or int(m.min(initial=0)) < 0:
            raise ValueError(f"{mk}: mask label {top} outside {{0, 1, 2}} (a Lad conditioning mask is expected)")
        out.append(SyntheticSample(id=str(rec.get("id", ct.name)), ct=ct, mask=mk, source_id=rec.get("source_id"),
                                   source_path=rec.get("source_mask")))
    if any(s.ct.suffix == ".npy" for s in out):
        log.warning("%s: .npy samples carry no geometry; assumed to be on the prepared windows' spacing", folder)
    return out


@dataclass
class TestPatient:
    """A test patient's windows stitched along z: ``hu`` int16 / ``mask`` uint8 ``(D', H, W)``, ``spacing`` mm (D, H, W).

    Windows that do not touch are separated by one empty slice (``gap_slices`` lists them): it
    keeps their tumour components apart and is background in prediction and ground truth alike.
    """

    patient: str
    hu: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    gap_slices: list[int]


def stitch_test_patients(ds) -> list[TestPatient]:
    """Stitch each patient's windows (``meta['z_range']`` on the patient's prepared grid) into one volume."""
    by_patient: dict[str, list[int]] = {}
    for i, w in enumerate(ds.windows):
        by_patient.setdefault(w["patient"], []).append(i)
    out = []
    for pid in sorted(by_patient):
        idx = sorted(by_patient[pid], key=lambda i: ds.windows[i]["z_range"][0])
        pieces_hu, pieces_mask, gaps = [], [], []
        seg_hu = seg_mask = None
        seg_start = seg_end = 0
        spacing = axis_spacing(ds.windows[idx[0]]["affine"])
        for i in idx:
            r = ds.get_arrays(i, organs=False)
            z0, z1 = (int(v) for v in r["meta"]["z_range"])
            if seg_hu is not None and z0 > seg_end:  # a gap: close the segment
                pieces_hu.append(seg_hu), pieces_mask.append(seg_mask)
                seg_hu = None
            if seg_hu is None:
                seg_hu, seg_mask, seg_start, seg_end = r["hu"].copy(), r["mask"].copy(), z0, z1
                continue
            if z1 > seg_end:
                grow = z1 - seg_end
                seg_hu = np.concatenate([seg_hu, np.zeros((grow, *seg_hu.shape[1:]), seg_hu.dtype)])
                seg_mask = np.concatenate([seg_mask, np.zeros((grow, *seg_mask.shape[1:]), seg_mask.dtype)])
                seg_end = z1
            seg_hu[z0 - seg_start:z1 - seg_start] = r["hu"]
            seg_mask[z0 - seg_start:z1 - seg_start] = r["mask"]
        pieces_hu.append(seg_hu), pieces_mask.append(seg_mask)
        hu, mask = pieces_hu[0], pieces_mask[0]
        for h, m in zip(pieces_hu[1:], pieces_mask[1:]):
            gaps.append(hu.shape[0])
            hu = np.concatenate([hu, np.full((1, *h.shape[1:]), -1000, h.dtype), h])
            mask = np.concatenate([mask, np.zeros((1, *m.shape[1:]), m.dtype), m])
        out.append(TestPatient(patient=pid, hu=hu, mask=mask, spacing=spacing, gap_slices=gaps))
    return out
