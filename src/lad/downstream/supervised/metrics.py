"""Segmentation and detection metrics of the tumour-scaling protocol (per patient, then aggregated).

Labels are the Lad mask's: 0 background, 1 organ of interest, 2 tumour. Arrays are ``(D, H, W)``
integer label maps; ``spacing`` is ``(sd, sh, sw)`` in mm along the array axes (from the window affine).

Definitions (docs/downstream-supervised.md):

* **DSC** per class: MONAI ``compute_dice`` without background. A patient whose ground truth lacks
  the class gets NaN for it (whatever the prediction) and is left out of the class mean; false
  positives on tumour-free patients are counted by the specificity instead.
* **NSD** per class: MONAI ``compute_surface_dice`` with ``spacing=`` (mm) and a tolerance in mm
  per class. Ground truth lacking the class -> NaN (as DSC); ground truth present but nothing
  predicted -> 0 (MONAI would return NaN/inf distances there).
* **Patient-level sensitivity**: fraction of patients with a ground-truth tumour that are detected:
  the prediction holds at least ``min_detect_voxels`` tumour voxels (the scan is flagged as a tumour
  case) and overlaps at least one ground-truth tumour component (a flag raised by a false positive
  elsewhere does not count). **Specificity**: fraction of tumour-free patients not flagged.
* **Tumour-level sensitivity**: fraction of ground-truth tumour components (``scipy.ndimage.label``,
  26-connectivity) overlapped by at least one predicted tumour voxel.
* **Early-tumour sensitivity**: the same over the components whose equivalent diameter
  ``(6 V / pi) ** (1/3)`` (V in mm^3, from the spacing) is at most ``early_diameter_mm`` (20 mm:
  the T1 size limit of pancreatic cancer, "early" in the tumour-scaling paper).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["CLASS_NAMES", "PatientMetrics", "dice_per_class", "nsd_per_class", "tumour_components", "patient_metrics",
           "aggregate", "equivalent_diameter_mm"]

CLASS_NAMES: dict[int, str] = {1: "organ", 2: "tumor"}


def _onehot(labels: np.ndarray, num_classes: int = 3) -> torch.Tensor:
    """(D, H, W) int -> (1, C, D, H, W) float one-hot."""
    t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(t, num_classes).permute(3, 0, 1, 2)[None].float()


def dice_per_class(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """DSC of organ (1) and tumour (2); NaN where the ground truth lacks the class."""
    from monai.metrics import compute_dice

    d = compute_dice(_onehot(pred), _onehot(gt), include_background=False, ignore_empty=True)[0]
    return {CLASS_NAMES[k]: float(d[k - 1]) for k in CLASS_NAMES}


def nsd_per_class(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: dict[str, float]) -> dict[str, float]:
    """Normalised surface Dice of organ and tumour at ``tolerance_mm[name]`` mm with ``spacing`` (mm per axis)."""
    from monai.metrics import compute_surface_dice

    out = {}
    for k, name in CLASS_NAMES.items():
        g, p = gt == k, pred == k
        if not g.any():
            out[name] = math.nan
            continue
        if not p.any():
            out[name] = 0.0
            continue
        two = np.where(p, 1, 0), np.where(g, 1, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.6 deprecation inside get_mask_edges
            v = compute_surface_dice(_onehot(two[0], 2), _onehot(two[1], 2), class_thresholds=[float(tolerance_mm[name])],
                                     include_background=False, spacing=[float(s) for s in spacing])
        out[name] = float(v[0, 0])
    return out


def equivalent_diameter_mm(voxels: int, spacing: Sequence[float]) -> float:
    """Diameter (mm) of the sphere with the volume of ``voxels`` voxels of size ``spacing`` (mm)."""
    volume = voxels * float(np.prod(spacing))
    return (6.0 * volume / math.pi) ** (1.0 / 3.0)


def tumour_components(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> list[dict]:
    """Ground-truth tumour components (26-connected): voxels, equivalent diameter (mm), detected (bool)."""
    from scipy import ndimage

    lab, n = ndimage.label(gt == 2, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    ids = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, ids)
    hits = ndimage.sum_labels(pred == 2, lab, ids)
    return [{"voxels": int(s), "diameter_mm": equivalent_diameter_mm(int(s), spacing), "detected": bool(h > 0)}
            for s, h in zip(sizes, hits)]


@dataclass
class PatientMetrics:
    """Metrics of one test patient (see the module docstring for the definitions)."""

    patient: str
    dice: dict[str, float]
    nsd: dict[str, float]
    has_tumour: bool
    tumour_flagged: bool
    tumour_detected: bool
    predicted_tumour_voxels: int
    components: list[dict]

    def to_dict(self) -> dict:
        nan_to_none = lambda d: {k: (None if math.isnan(v) else v) for k, v in d.items()}  # noqa: E731  (JSON has no NaN)
        return {"patient": self.patient, "dice": nan_to_none(self.dice), "nsd": nan_to_none(self.nsd),
                "has_tumor": self.has_tumour, "tumor_flagged": self.tumour_flagged, "tumor_detected": self.tumour_detected,
                "predicted_tumor_voxels": self.predicted_tumour_voxels, "components": self.components}


def patient_metrics(patient: str, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], *,
                    tolerance_mm: dict[str, float], min_detect_voxels: int = 1) -> PatientMetrics:
    """All per-patient metrics for prediction ``pred`` vs ground truth ``gt`` (both ``(D, H, W)`` in {0, 1, 2})."""
    if pred.shape != gt.shape:
        raise ValueError(f"patient {patient}: prediction shape {pred.shape} != ground truth shape {gt.shape}")
    n_pred = int((pred == 2).sum())
    comps = tumour_components(gt, pred, spacing)
    flagged = n_pred >= min_detect_voxels
    return PatientMetrics(patient=patient, dice=dice_per_class(pred, gt), nsd=nsd_per_class(pred, gt, spacing, tolerance_mm),
                          has_tumour=bool(comps), tumour_flagged=flagged,
                          tumour_detected=flagged and any(c["detected"] for c in comps),
                          predicted_tumour_voxels=n_pred, components=comps)


def _rate(hits: int, total: int) -> dict:
    return {"value": (hits / total) if total else None, "hits": hits, "total": total}


def aggregate(patients: list[PatientMetrics], *, early_diameter_mm: float = 20.0) -> dict:
    """Means over patients (NaN-excluded, with the count used) and the detection rates with their counts."""
    out: dict = {}
    for key in ("dice", "nsd"):
        out[key] = {}
        for name in CLASS_NAMES.values():
            vals = [getattr(p, key)[name] for p in patients if not math.isnan(getattr(p, key)[name])]
            out[key][name] = {"mean": float(np.mean(vals)) if vals else None, "n": len(vals)}
    tum = [p for p in patients if p.has_tumour]
    healthy = [p for p in patients if not p.has_tumour]
    comps = [c for p in patients for c in p.components]
    early = [c for c in comps if c["diameter_mm"] <= early_diameter_mm]
    out["patient_sensitivity"] = _rate(sum(p.tumour_detected for p in tum), len(tum))
    out["patient_specificity"] = _rate(sum(not p.tumour_flagged for p in healthy), len(healthy))
    out["tumor_sensitivity"] = _rate(sum(c["detected"] for c in comps), len(comps))
    out["early_tumor_sensitivity"] = _rate(sum(c["detected"] for c in early), len(early))
    return out
