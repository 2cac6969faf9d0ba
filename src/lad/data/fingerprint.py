"""Dataset fingerprint (nnU-Net's habit): numbers derived from the data, computed once into JSON.

Later stages read it instead of typing values by hand: the sampling quality check uses the
per-organ HU percentiles, the report shows spacings and shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lad.data.labels import ORGAN_NAMES

__all__ = ["compute_fingerprint", "PERCENTILES"]

PERCENTILES = (0.5, 5.0, 50.0, 95.0, 99.5)
_MAX_VOXELS_PER_ORGAN = 200_000


def _pct(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    return {f"{p:g}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def compute_fingerprint(root: Path, manifest: dict[str, Any], metas: dict[str, dict]) -> dict[str, Any]:
    """Fingerprint of a prepared dataset from its training patients' windows (all if none trains).

    Keys: ``n_patients`` / ``n_windows`` per split, ``window_shape`` (D, H, W), ``target_spacing``
    (x, y, z mm), ``source_spacing`` and ``resampled_shape`` (D, H, W before the in-plane crop)
    median/min/max, ``hu_percentiles`` (0.5/5/50/95/99.5 HU over the windows; up to 50,000 voxels
    drawn per patient with a fixed seed) and ``hu_percentiles_per_organ`` (inside each organ's label),
    ``label_voxels`` (voxels per label summed over the training windows; overlapping windows count a
    voxel once per window), ``computed_from``.
    """
    rng = np.random.default_rng(0)
    train = [cid for cid, m in metas.items() if m["split"] == "train"] or list(metas)
    hu_all: list[np.ndarray] = []
    per_organ: dict[int, list[np.ndarray]] = {k: [] for k in range(1, 6)}
    counts = np.zeros(6, dtype=np.int64)
    for cid in sorted(train):
        img = np.load(root / "patients" / cid / "image.npy", mmap_mode="r")
        org = np.load(root / "patients" / cid / "organs.npy", mmap_mode="r")
        flat_i = np.asarray(img).ravel()
        flat_o = np.asarray(org).ravel()
        counts += np.bincount(flat_o, minlength=6)[:6]
        hu_all.append(flat_i[rng.integers(0, flat_i.size, size=min(flat_i.size, 50_000))])
        for k in range(1, 6):
            sel = flat_i[flat_o == k]
            if sel.size:
                per_organ[k].append(sel[rng.integers(0, sel.size, size=min(sel.size, _MAX_VOXELS_PER_ORGAN // max(1, len(train))))])
    spacings = np.array([metas[c]["source_spacing"] for c in train]) if train else np.zeros((0, 3))
    shapes = np.array([metas[c]["resampled_shape"] for c in train]) if train else np.zeros((0, 3))
    windows = manifest["windows"]
    return {
        "n_patients": {s: len(v) for s, v in manifest["splits"].items()},
        "n_windows": {s: sum(w["split"] == s for w in windows) for s in ("train", "test")},
        "window_shape": [manifest["config"]["depth"], *manifest["config"]["size"]],
        "target_spacing": manifest["config"]["spacing"],
        "source_spacing": {
            "median": np.median(spacings, 0).tolist() if len(spacings) else None,
            "min": spacings.min(0).tolist() if len(spacings) else None,
            "max": spacings.max(0).tolist() if len(spacings) else None,
        },
        "resampled_shape": {
            "median": np.median(shapes, 0).tolist() if len(shapes) else None,
            "min": shapes.min(0).tolist() if len(shapes) else None,
            "max": shapes.max(0).tolist() if len(shapes) else None,
        },
        "hu_percentiles": _pct(np.concatenate(hu_all)) if hu_all else None,
        "hu_percentiles_per_organ": {
            ORGAN_NAMES[k]: _pct(np.concatenate(v)) for k, v in per_organ.items() if v
        },
        "label_voxels": {ORGAN_NAMES[k]: int(counts[k]) for k in range(1, 6)},
        "computed_from": "train" if any(m["split"] == "train" for m in metas.values()) else "all",
    }
