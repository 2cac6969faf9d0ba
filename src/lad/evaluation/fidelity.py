"""Conditioning fidelity: does a synthetic volume contain the organ its mask asked for, where it asked?

A segmenter trained on real prepared data (``lad priors train``; the same folder format the priors
use) segments each synthetic volume; Dice between its organ-of-interest (+ tumour) prediction and
the conditioning mask (labels 1 and 2), and between its tumour prediction and mask label 2. A
generator that ignores its condition scores low here even when its FID is good. The same segmenter
on the held-out real windows (against their own masks) gives the ceiling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lad.data.labels import ORGAN_LABELS

__all__ = ["conditioning_fidelity", "load_segmenter", "segment", "FidelityDice"]


def load_segmenter(segmenter: str | Path, device: str | torch.device = "cpu"):
    """The ``Segmenter`` of a ``lad priors train`` folder (``DIR`` or ``DIR/model``), in eval mode on ``device``."""
    from lad.priors.segmenter import Segmenter

    seg_dir = Path(segmenter)
    seg_dir = seg_dir / "model" if (seg_dir / "model").is_dir() else seg_dir
    return Segmenter.from_pretrained(seg_dir, map_location=device).to(device).eval()


def segment(model, volume: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """Organ label map ``(D, H, W)`` uint8 (0..5) of one volume ``(1, D, H, W)`` in [0, 1]."""
    x = torch.from_numpy(np.asarray(volume, np.float32)[None]).to(device)
    return model.predict(x)[0].cpu().numpy().astype(np.uint8)


class FidelityDice:
    """Accumulates Dice counts (summed over volumes) of predictions against conditioning masks."""

    def __init__(self, organ: str = "pancreas"):
        self.organ_id, self.tumor_id = ORGAN_LABELS[organ], ORGAN_LABELS["tumor"]
        self.inter = {"organ": 0, "tumor": 0}
        self.total = {"organ": 0, "tumor": 0}
        self.per_volume: list[dict[str, tuple[int, int]]] = []  # (intersection, total) per volume, for intervals

    def update(self, pred: np.ndarray, mask: np.ndarray) -> None:
        """``pred``: organ label map ``(D, H, W)``; ``mask``: Lad mask ``(D, H, W)`` in {0, 1, 2}."""
        counts = {}
        for key, p, g in (("organ", np.isin(pred, (self.organ_id, self.tumor_id)), mask > 0),
                          ("tumor", pred == self.tumor_id, mask == 2)):
            counts[key] = (int(np.logical_and(p, g).sum()), int(p.sum() + g.sum()))
            self.inter[key] += counts[key][0]
            self.total[key] += counts[key][1]
        self.per_volume.append(counts)

    def value(self) -> dict[str, float]:
        """``{"organ": ..., "tumor": ...}`` (a key is left out when neither side has that label)."""
        return {k: 2 * self.inter[k] / self.total[k] for k in self.inter if self.total[k] > 0}

    def ci95(self, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
        """Bootstrap interval of each ``value()`` key: volumes resampled with replacement, counts re-summed."""
        from lad.evaluation.uncertainty import bootstrap_indices, ci_from_replicates

        if n_boot < 1 or not self.per_volume:
            return {}
        idx = bootstrap_indices(len(self.per_volume), n_boot, np.random.default_rng(seed))
        out = {}
        for k, v in self.value().items():
            inter = np.array([c[k][0] for c in self.per_volume], np.float64)
            total = np.array([c[k][1] for c in self.per_volume], np.float64)
            reps = [2 * inter[r].sum() / total[r].sum() if total[r].sum() > 0 else np.nan for r in idx]
            out[k] = [min(1.0, max(0.0, x)) for x in ci_from_replicates(reps, v, level)]
        return out


def conditioning_fidelity(segmenter: str | Path, volumes: list[np.ndarray], masks: list[np.ndarray], *, organ: str = "pancreas",
                          device: str = "cpu") -> dict[str, float]:
    """Dice (summed counts over all volumes) per condition label: ``{"organ": ..., "tumor": ...}``."""
    model = load_segmenter(segmenter, device)
    acc = FidelityDice(organ)
    for v, m in zip(volumes, masks):
        acc.update(segment(model, v, device), m)
    return acc.value()
