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

__all__ = ["conditioning_fidelity", "conditioning_fidelity_with_ci"]


def conditioning_fidelity(segmenter: str | Path, volumes: list[np.ndarray], masks: list[np.ndarray], *, organ: str = "pancreas",
                          device: str = "cpu") -> dict[str, float]:
    """Dice (summed counts over all volumes) per condition label: ``{"organ": ..., "tumor": ...}``."""
    return conditioning_fidelity_with_ci(segmenter, volumes, masks, organ=organ, device=device, n_boot=0)[0]


def conditioning_fidelity_with_ci(segmenter: str | Path, volumes: list[np.ndarray], masks: list[np.ndarray], *,
                                  organ: str = "pancreas", device: str = "cpu", n_boot: int = 200, seed: int = 0,
                                  level: float = 0.95) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``conditioning_fidelity`` and its bootstrap interval per label (volumes resampled, counts re-summed)."""
    from lad.evaluation.uncertainty import bootstrap_indices, ci_from_replicates

    from lad.priors.segmenter import Segmenter

    seg_dir = Path(segmenter)
    seg_dir = seg_dir / "model" if (seg_dir / "model").is_dir() else seg_dir
    model = Segmenter.from_pretrained(seg_dir, map_location=device).to(device).eval()
    organ_id, tumor_id = ORGAN_LABELS[organ], ORGAN_LABELS["tumor"]
    inter = {"organ": np.zeros(len(volumes)), "tumor": np.zeros(len(volumes))}  # per volume
    total = {"organ": np.zeros(len(volumes)), "tumor": np.zeros(len(volumes))}
    for i, (v, m) in enumerate(zip(volumes, masks)):
        pred = model.predict(torch.from_numpy(np.asarray(v, np.float32)[None]).to(device))[0].cpu().numpy()
        for key, p, g in (("organ", np.isin(pred, (organ_id, tumor_id)), m > 0), ("tumor", pred == tumor_id, m == 2)):
            inter[key][i] = np.logical_and(p, g).sum()
            total[key][i] = p.sum() + g.sum()
    dice = {k: float(2 * inter[k].sum() / total[k].sum()) for k in inter if total[k].sum() > 0}
    if n_boot < 1:
        return dice, {}
    idx = bootstrap_indices(len(volumes), n_boot, np.random.default_rng(seed))
    ci = {}
    for k in dice:
        reps = [2 * inter[k][r].sum() / total[k][r].sum() if total[k][r].sum() > 0 else np.nan for r in idx]
        ci[k] = [min(1.0, max(0.0, x)) for x in ci_from_replicates(reps, dice[k], level)]
    return dice, ci
