"""Label conventions shared by every stage.

Organ label map (AbdomenCT-1K's labels, plus our tumour extension), stored as ``organs``:
    0 background, 1 liver, 2 kidney, 3 spleen, 4 pancreas, 5 tumour (pancreatic; our extension).

Lad mask (the paper's condition), stored as ``mask``:
    0 background, 1 organ of interest (pancreas by default), 2 tumour.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ORGAN_LABELS", "ORGAN_NAMES", "TUMOR_LABEL", "LAD_LABELS", "lad_mask_from_organs", "HU_MIN", "HU_MAX", "hu_to_unit", "unit_to_hu"]

ORGAN_LABELS: dict[str, int] = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4, "tumor": 5}
ORGAN_NAMES: dict[int, str] = {v: k for k, v in ORGAN_LABELS.items()}
TUMOR_LABEL = 5
LAD_LABELS: dict[str, int] = {"background": 0, "organ": 1, "tumor": 2}

# Paper section 4.1.2: HU clipped to [-1000, 400] and scaled to [0, 1].
HU_MIN = -1000.0
HU_MAX = 400.0


def lad_mask_from_organs(organs: np.ndarray, organ: str = "pancreas") -> np.ndarray:
    """Lad mask from an organ label map: 1 where ``organ``, 2 where tumour (tumour wins), else 0."""
    if organ not in ORGAN_LABELS or organ in ("background", "tumor"):
        raise ValueError(f"organ of interest must be one of liver, kidney, spleen, pancreas; got {organ!r}")
    mask = np.zeros(organs.shape, dtype=np.uint8)
    mask[organs == ORGAN_LABELS[organ]] = 1
    mask[organs == TUMOR_LABEL] = 2
    return mask


def hu_to_unit(hu: np.ndarray) -> np.ndarray:
    """HU -> [0, 1]: clip to [HU_MIN, HU_MAX] and scale (float32)."""
    hu = np.clip(np.asarray(hu, dtype=np.float32), HU_MIN, HU_MAX)
    return (hu - HU_MIN) / (HU_MAX - HU_MIN)


def unit_to_hu(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> HU (inverse of ``hu_to_unit`` inside the window)."""
    return np.asarray(x, dtype=np.float32) * (HU_MAX - HU_MIN) + HU_MIN
