"""SSL-ALPNet's 1-shot evaluation protocol (Ouyang et al. 2022, ``dataloaders/common.py`` / ``get_support``).

For one test organ, with one support scan and the other labeled scans as queries:

* support slices: of the support scan's slices that contain the organ (``C`` of them, ascending z), the
  ones at positions ``int(p * C)`` for ``p`` in ``1/6, 1/2, 5/6`` (three parts);
* query chunks: a query slice ``z`` inside the query organ's range ``[z_min, z_max]`` belongs to part
  ``int((z - z_min) // ((z_max - z_min) / 3))`` clipped to 0..2 (part 0 when ``z_min == z_max``) and is
  segmented with that part's support slice;
* only slices in ``[z_min, z_max]`` are scored (slices inside the range without the organ count, as
  their false positives do); TP / FP / FN are summed over a scan, Dice = 2TP / (2TP + FP + FN) per scan,
  and an organ's Dice is the mean over the query scans.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lad.downstream.ssl.data import Scan, organ_binary, resize_volume

__all__ = ["support_positions", "query_part", "chunk_plan", "dice_from_counts", "evaluate_organ", "alpnet_predictor"]

# (support_image (S, S) float, support_mask (S, S) bool, query_images (N, S, S) float) -> (N, S, S) bool
Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def support_positions(n_part: int = 3) -> list[float]:
    """Relative positions of the support slices in the support organ's slice list: 1/6, 1/2, 5/6 for 3 parts."""
    if n_part < 1:
        raise ValueError(f"n_part must be >= 1, got {n_part}")
    if n_part == 1:
        return [0.5]
    half, step = 1 / (2 * n_part), (1 - 1 / n_part) / (n_part - 1)
    return [half + step * i for i in range(n_part)]


def query_part(z: int, z_min: int, z_max: int, n_part: int = 3) -> int:
    """The part (chunk) of query slice ``z`` in the organ range ``[z_min, z_max]``."""
    if z_max == z_min:
        return 0
    part = int((z - z_min) // ((z_max - z_min) / n_part))
    return min(max(part, 0), n_part - 1)


def chunk_plan(support_z: np.ndarray, query_z_min: int, query_z_max: int, n_part: int = 3) -> list[tuple[int, int]]:
    """``(query slice, support slice)`` pairs for one query scan: ``support_z`` are the support scan's organ slices
    (ascending); every query slice of ``[query_z_min, query_z_max]`` is paired with its part's support slice."""
    support_z = np.asarray(support_z)
    if len(support_z) == 0:
        raise ValueError("the support scan has no slice with the organ")
    picks = [int(support_z[int(p * len(support_z))]) for p in support_positions(n_part)]
    return [(z, picks[query_part(z, query_z_min, query_z_max, n_part)]) for z in range(query_z_min, query_z_max + 1)]


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """2TP / (2TP + FP + FN); 1.0 when all three are 0."""
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2 * tp / den


def evaluate_organ(predictor: Predictor, support: Scan, queries: list[Scan], organ: str, *, size: int, n_part: int = 3) -> dict:
    """1-shot Dice of ``organ``: slices resized to ``size`` x ``size`` (labels nearest). Returns ``dice`` (mean over
    queries), ``per_scan`` ``{scan id: dice}``, ``support`` (id and support slices), ``counts`` per scan."""
    if support.organs is None:
        raise ValueError(f"support scan {support.id} has no organ labels")
    s_img = resize_volume(support.image, size)
    s_lab = resize_volume(organ_binary(support.organs, organ).astype(np.uint8), size, labels=True).astype(bool)
    s_z = np.flatnonzero(s_lab.reshape(len(s_lab), -1).any(axis=1))
    if len(s_z) == 0:
        raise ValueError(f"support scan {support.id} has no {organ} voxels at the evaluation size {size}")
    per_scan, counts = {}, {}
    for q in queries:
        q_img = resize_volume(q.image, size)
        q_lab = resize_volume(organ_binary(q.organs, organ).astype(np.uint8), size, labels=True).astype(bool)
        q_z = np.flatnonzero(q_lab.reshape(len(q_lab), -1).any(axis=1))
        if len(q_z) == 0:
            continue
        plan = chunk_plan(s_z, int(q_z.min()), int(q_z.max()), n_part)
        tp = fp = fn = 0
        for sz in sorted({s for _, s in plan}):
            zs = np.array([z for z, s in plan if s == sz])
            pred = np.asarray(predictor(s_img[sz], s_lab[sz], q_img[zs])).astype(bool)
            gt = q_lab[zs]
            tp += int((pred & gt).sum())
            fp += int((pred & ~gt).sum())
            fn += int((~pred & gt).sum())
        per_scan[q.id] = dice_from_counts(tp, fp, fn)
        counts[q.id] = {"tp": tp, "fp": fp, "fn": fn, "slices": len(plan)}
    if not per_scan:
        raise ValueError(f"no query scan contains {organ}")
    picks = [int(s_z[int(p * len(s_z))]) for p in support_positions(n_part)]
    return {"dice": float(np.mean(list(per_scan.values()))), "per_scan": per_scan, "counts": counts,
            "support": {"scan": support.id, "slices": picks}}


def alpnet_predictor(model, device: torch.device | str = "cpu", batch_size: int = 16) -> Predictor:
    """A :data:`Predictor` from an ``ALPNet`` (eval mode: test pooling window, no gradient); the support
    slice is encoded once per call."""
    import torch.nn.functional as F

    def predict(support_image: np.ndarray, support_mask: np.ndarray, query_images: np.ndarray) -> np.ndarray:
        model.eval()
        out = []
        with torch.no_grad():
            s_img = torch.from_numpy(np.ascontiguousarray(support_image, dtype=np.float32))[None, None].to(device)
            s_m = torch.from_numpy(np.ascontiguousarray(support_mask, dtype=np.float32)).to(device)
            sf = model.features(s_img)[0]
            for i in range(0, len(query_images), batch_size):
                q = torch.from_numpy(np.ascontiguousarray(query_images[i : i + batch_size], dtype=np.float32))[:, None].to(device)
                qf = model.features(q)
                sc = torch.stack([model.scores(qf[j], sf, s_m, model.test_window) for j in range(qf.shape[0])])
                logits = F.interpolate(sc, size=q.shape[-2:], mode="bilinear", align_corners=False)
                out.append(logits.argmax(dim=1).cpu().numpy().astype(bool))
        return np.concatenate(out)
    return predict
