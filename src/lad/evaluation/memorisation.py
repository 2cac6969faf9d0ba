"""Memorisation check: are synthetic volumes suspiciously close (in feature space) to training volumes?

A synthetic volume is flagged when its nearest training volume is closer than the nearest training
volume of ANY held-out real volume, i.e. its distance is below
``threshold = min over held-out h of min over train t of |h - t|``. Held-out volumes are real
scans the model never saw, so this is the closest "honest" distance observed; a generator that copies
a training scan produces a distance near 0, far below it. Conservative by design: it flags only
near-copies, not subtle memorisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lad.evaluation.realism import pairwise_sq_dists

__all__ = ["nearest_distances", "memorisation_report"]


def nearest_distances(query_feats: Any, ref_feats: Any, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance and index of the nearest ``ref`` row for every ``query`` row.

    The nearest row is found from the expanded squared distances in chunks of ``chunk`` queries; the
    returned distance is then recomputed directly as ``|q - r|`` (float64), so an exact copy gives 0.

    Args:
        query_feats: ``(Q, F)``; ref_feats: ``(R, F)`` with R >= 1.
    Returns:
        ``dist`` ``(Q,)`` float64, ``index`` ``(Q,)`` int64 into ``ref_feats``.
    """
    q, r = np.asarray(query_feats, np.float64), np.asarray(ref_feats, np.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1] or len(r) == 0:
        raise ValueError(f"nearest_distances: expected (Q, F) and (R >= 1, F) features, got {q.shape} and {r.shape}")
    idx = np.empty(len(q), np.int64)
    for s in range(0, len(q), chunk):
        idx[s : s + chunk] = pairwise_sq_dists(q[s : s + chunk], r).argmin(1)
    dist = np.linalg.norm(q - r[idx], axis=1) if len(q) else np.zeros(0)
    return dist, idx


def memorisation_report(synth_feats: Any, train_feats: Any, heldout_feats: Any, top: int = 5) -> dict[str, Any]:
    """Flag synthetic volumes nearer to a training volume than any held-out real volume is (see module doc).

    Args:
        synth_feats ``(S, F)``, train_feats ``(T, F)``, heldout_feats ``(H, F)`` from one extractor, H >= 1.
        top: how many closest synthetic/training pairs to list.
    Returns:
        ``{"threshold", "n_flagged", "flagged" (synthetic indices, ascending), "n_synthetic",
        "closest_pairs": [{"synthetic", "train", "distance"}] (closest first),
        "synthetic_nn_distance": {"min", "median"}, "heldout_nn_distance": {"min", "median", "closest_train"}}``.
    """
    d_syn, i_syn = nearest_distances(synth_feats, train_feats)
    d_held, i_held = nearest_distances(heldout_feats, train_feats)
    if len(d_held) == 0:
        raise ValueError("memorisation_report: needs at least one held-out real volume to set the threshold")
    threshold = float(d_held.min())
    flagged = np.flatnonzero(d_syn < threshold)
    order = np.argsort(d_syn, kind="stable")[:top]
    return {
        "threshold": threshold, "n_flagged": int(len(flagged)), "flagged": flagged.tolist(), "n_synthetic": int(len(d_syn)),
        "closest_pairs": [{"synthetic": int(i), "train": int(i_syn[i]), "distance": float(d_syn[i])} for i in order],
        "synthetic_nn_distance": {"min": float(d_syn.min()) if len(d_syn) else float("nan"),
                                  "median": float(np.median(d_syn)) if len(d_syn) else float("nan")},
        "heldout_nn_distance": {"min": threshold, "median": float(np.median(d_held)),
                                "closest_train": int(i_held[np.argmin(d_held)])},
    }
