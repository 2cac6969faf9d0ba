"""Conditioning fidelity: does a synthetic volume contain the organ its mask asked for, where it asked?

A segmenter trained on real prepared data (``lad priors train``; the same folder format the priors
use) segments each synthetic volume; Dice between its organ-of-interest (+ tumour) prediction and
the conditioning mask (labels 1 and 2), and between its tumour prediction and mask label 2. A
generator that ignores its condition scores low here even when its FID is good.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lad.data.labels import ORGAN_LABELS

__all__ = ["conditioning_fidelity"]


def conditioning_fidelity(segmenter: str | Path, volumes: list[np.ndarray], masks: list[np.ndarray], *, organ: str = "pancreas",
                          device: str = "cpu") -> dict[str, float]:
    """Dice (summed counts over all volumes) per condition label: ``{"organ": ..., "tumor": ...}``."""
    from lad.priors.segmenter import Segmenter

    seg_dir = Path(segmenter)
    seg_dir = seg_dir / "model" if (seg_dir / "model").is_dir() else seg_dir
    model = Segmenter.from_pretrained(seg_dir, map_location=device).to(device).eval()
    organ_id, tumor_id = ORGAN_LABELS[organ], ORGAN_LABELS["tumor"]
    inter = {"organ": 0, "tumor": 0}
    total = {"organ": 0, "tumor": 0}
    for v, m in zip(volumes, masks):
        pred = model.predict(torch.from_numpy(np.asarray(v, np.float32)[None]).to(device))[0].cpu().numpy()
        for key, p, g in (("organ", np.isin(pred, (organ_id, tumor_id)), m > 0), ("tumor", pred == tumor_id, m == 2)):
            inter[key] += int(np.logical_and(p, g).sum())
            total[key] += int(p.sum() + g.sum())
    return {k: 2 * inter[k] / total[k] for k in inter if total[k] > 0}
