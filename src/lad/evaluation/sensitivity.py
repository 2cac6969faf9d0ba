"""Do the realism metrics see what they should? Degrade a real set step by step and measure.

A metric worth reporting (paper section 4.2: holistic and localized FID, MMD) must grow with the
strength of a degradation and score a second real set below every degraded one. The degradations
(HU in, HU out, clipped to [-1000, 400]; deterministic given the seed):

- ``noise``: additive Gaussian noise, sigma in HU (10 / 30 / 100);
- ``blur``: Gaussian blur, sigma in voxels (1 / 2 / 4);
- ``shift``: +50 HU everywhere inside the body;
- ``organs removed``: every labelled organ voxel set to the median HU of the body voxels in a 2-voxel
  ring around the organs (fat / soft tissue): anatomy gone, global statistics almost unchanged.

``sensitivity_table`` scores a reference real set against a second real set and against each degraded
copy of it, with one feature extractor. Used by ``tests/test_metrics_sensitivity.py`` (tiny) and
``benchmarks/bench_metrics_sensitivity.py`` (demo sizes, in-domain and untrained features).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lad.data.labels import HU_MAX, HU_MIN, hu_to_unit, unit_to_hu

__all__ = ["DEGRADATIONS", "degrade", "sensitivity_table", "is_monotonic"]

DEGRADATIONS: dict[str, tuple[float, ...]] = {"noise": (10.0, 30.0, 100.0), "blur": (1.0, 2.0, 4.0), "shift": (50.0,),
                                              "organs removed": (1.0,)}
_BODY_HU = -500.0  # voxels above this are body (air is -1000)


def degrade(hu: np.ndarray, organs: np.ndarray, kind: str, strength: float, *, seed: int = 0) -> np.ndarray:
    """One degraded copy of ``hu`` ``(D, H, W)`` (HU); ``organs`` ``(D, H, W)`` uint8 organ labels (0 = none).

    Returns float32 HU clipped to [-1000, 400].
    """
    from scipy import ndimage

    hu = np.asarray(hu, np.float32)
    if kind == "noise":
        out = hu + np.random.default_rng(seed).normal(0.0, strength, hu.shape).astype(np.float32)
    elif kind == "blur":
        out = ndimage.gaussian_filter(hu, sigma=strength)
    elif kind == "shift":
        out = np.where(hu > _BODY_HU, hu + strength, hu)
    elif kind == "organs removed":
        organ = np.asarray(organs) > 0
        ring = ndimage.binary_dilation(organ, iterations=2) & ~organ & (hu > _BODY_HU)
        fill = float(np.median(hu[ring])) if ring.any() else float(np.median(hu[hu > _BODY_HU])) if (hu > _BODY_HU).any() else 0.0
        out = np.where(organ, fill, hu)
    else:
        raise ValueError(f"degradation must be one of {list(DEGRADATIONS)}, got {kind!r}")
    return np.clip(out, HU_MIN, HU_MAX).astype(np.float32)


def is_monotonic(values: Sequence[float]) -> bool:
    """Strictly increasing."""
    return all(b > a for a, b in zip(values, values[1:]))


def sensitivity_table(reference: Sequence[np.ndarray], other: Sequence[np.ndarray], other_organs: Sequence[np.ndarray],
                      extractor: Any, box: tuple[slice, ...], *, degradations: dict[str, Sequence[float]] | None = None,
                      seed: int = 0, progress_bar: bool = True) -> list[dict[str, Any]]:
    """Holistic FID, localized FID, MMD and localized MMD of ``reference`` vs ``other`` and vs degraded ``other``.

    ``reference`` / ``other``: volumes ``(1, D, H, W)`` in [0, 1]; ``other_organs``: their organ maps ``(D, H, W)``;
    ``extractor``: a ``FeatureExtractor``; ``box``: the localized crop (``lad.evaluation.crops.max_bounding_box``).
    Rows: ``{"degradation", "strength", "fid", "fid_localized", "mmd", "mmd_localized", "n_reference", "n"}``,
    the first one ``("none (real vs real)", 0)``.
    """
    from lad.evaluation.crops import apply_box
    from lad.evaluation.realism import fid, mmd

    degradations = DEGRADATIONS if degradations is None else degradations
    bars = {"progress_bar": progress_bar}
    f_ref = extractor.extract(list(reference), **bars)
    f_ref_loc = extractor.extract([apply_box(v, box) for v in reference], **bars)

    def row(name: str, strength: float, vols: list[np.ndarray]) -> dict[str, Any]:
        f, f_loc = extractor.extract(vols, **bars), extractor.extract([apply_box(v, box) for v in vols], **bars)
        return {"degradation": name, "strength": strength, "fid": fid(f_ref, f).value, "fid_localized": fid(f_ref_loc, f_loc).value,
                "mmd": mmd(f_ref, f).value, "mmd_localized": mmd(f_ref_loc, f_loc).value, "n_reference": len(f_ref), "n": len(f)}

    rows = [row("none (real vs real)", 0.0, [np.asarray(v, np.float32) for v in other])]
    for kind, strengths in degradations.items():
        for s in strengths:
            vols = [hu_to_unit(degrade(unit_to_hu(np.asarray(v)[0]), o, kind, s, seed=seed + i))[None].astype(np.float32)
                    for i, (v, o) in enumerate(zip(other, other_organs))]
            rows.append(row(kind, float(s), vols))
    return rows
