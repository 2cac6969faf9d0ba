"""Automatic anatomy and realism checks of synthetic CT, against the held-out real windows.

The paper judges anatomical structures by eye (section 4.2.2, "Anatomical Structures", Figure 5);
these checks count the same things per volume, each against a reference built from the held-out
real windows (which therefore set the ceiling of every check):

* **anatomy present**: a segmenter trained on real windows labels every volume; a structure is
  present when its predicted voxel count lies inside the range of the same segmenter's counts on the
  real windows (5th percentile rounded down to an observed count, 95th rounded up; at least 1 voxel).
* **body ok**: the body outline (largest connected component above -500 HU) covers a fraction of
  the window between the real windows' minimum and maximum.
* **bone ok**: a bone component (above 200 HU) lies in the spine position of the real windows.
* **per-tissue HU**: Wasserstein-1 distance (HU) between synthetic and real HU values inside the
  conditioning organ and inside the body.

Volumes here are HU arrays ``(D, H, W)`` (float, HU [-1000, 400] after the paper's clip, section 4.1.2)
and label maps ``(D, H, W)`` uint8 (0 background, 1 liver, 2 kidney, 3 spleen, 4 pancreas, 5 tumour).
Pure numpy/scipy; one volume at a time, so sets of any size fit in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np
from scipy import ndimage

from lad.data.labels import ORGAN_LABELS

__all__ = ["BODY_HU", "BONE_HU", "STRUCTURES", "CORE_STRUCTURES", "structure_voxels", "presence_ranges", "present", "wilson_interval",
           "body_component", "body_fraction", "spine_region", "has_spine_bone", "hu_w1", "HUSampler", "AnatomyReference"]

BODY_HU = -500.0
"""Voxels above this HU are body (air and lung are below)."""
BONE_HU = 200.0
"""Voxels above this HU are bone (cancellous bone is ~250 HU, soft tissue and contrast-enhanced vessels are below)."""
STRUCTURES = ("liver", "kidney", "spleen", "pancreas", "tumor")
CORE_STRUCTURES = ("liver", "kidney", "spleen")
"""The structures whose mean present fraction is the headline number (the pancreas is the conditioning
organ, measured by the conditioning-fidelity Dice; the tumour is absent from many real windows)."""

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity for every component in this module


def structure_voxels(labels: np.ndarray) -> dict[str, int]:
    """Voxel count per structure of a label map ``(D, H, W)`` (organ labels 0..5): ``{"liver": n, ...}``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=len(ORGAN_LABELS))
    return {s: int(counts[ORGAN_LABELS[s]]) for s in STRUCTURES}


def presence_ranges(real_counts: list[dict[str, int]], *, lo: float = 5.0, hi: float = 95.0) -> dict[str, tuple[int, int]]:
    """Per structure, the ``[lo, hi]`` percentile range of the real windows' predicted voxel counts.

    The lower percentile is rounded down and the upper one up to an observed count (numpy's
    ``method="lower"`` / ``"higher"``): with few windows the range spans the real counts' minimum and
    maximum, with many it tends to the 5th-95th percentile range.
    """
    if not real_counts:
        raise ValueError("presence_ranges needs the voxel counts of at least one real window")
    out = {}
    for s in STRUCTURES:
        v = np.array([c[s] for c in real_counts], dtype=np.float64)
        out[s] = (int(np.percentile(v, lo, method="lower")), int(np.percentile(v, hi, method="higher")))
    return out


def present(counts: dict[str, int], ranges: dict[str, tuple[int, int]]) -> dict[str, bool]:
    """Whether each structure is present: ``max(1, low) <= count <= high`` (an absent structure never is)."""
    return {s: bool(max(1, ranges[s][0]) <= counts[s] <= ranges[s][1]) for s in STRUCTURES}


def body_component(hu: np.ndarray, threshold: float = BODY_HU) -> np.ndarray:
    """The body: the largest 26-connected component of voxels above ``threshold`` HU, bool ``(D, H, W)``."""
    lab, n = ndimage.label(np.asarray(hu) > threshold, structure=_FULL)
    if n == 0:
        return np.zeros(lab.shape, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def body_fraction(hu: np.ndarray, threshold: float = BODY_HU) -> float:
    """Fraction of the window's voxels covered by the body component (0 for an empty window, 1 for a full one)."""
    return float(body_component(hu, threshold).mean())


def spine_region(real_hu: Iterable[np.ndarray], *, frequency: float = 0.5, dilate: int = 2,
                 threshold: float = BONE_HU) -> np.ndarray:
    """The spine position of the real windows, bool ``(D, H, W)``.

    Voxels that are bone (above ``threshold`` HU) in at least ``frequency`` of the real windows, dilated
    by ``dilate`` voxels (26-connectivity). The spine sits at the same place in every prepared window
    (posterior midline) while ribs and calcifications move between patients, so the frequency keeps the
    spine and drops the rest. Empty when no voxel is bone that often.
    """
    total, n = None, 0
    for hu in real_hu:
        b = (np.asarray(hu) > threshold).astype(np.float64)
        total = b if total is None else total + b
        n += 1
    if n == 0:
        raise ValueError("spine_region needs at least one real window")
    core = total / n >= frequency
    if dilate and core.any():
        core = ndimage.binary_dilation(core, structure=_FULL, iterations=dilate)
    return core


def has_spine_bone(hu: np.ndarray, region: np.ndarray, *, min_voxels: int, threshold: float = BONE_HU,
                   inside: float = 0.5) -> bool:
    """Whether ``hu`` holds a bone component in the spine position.

    True when some 26-connected component of voxels above ``threshold`` HU has at least ``min_voxels``
    voxels and at least ``inside`` of its voxels in ``region`` (so a bright slab that merely crosses the
    spine region, e.g. a constant volume above 200 HU, does not count).
    """
    lab, n = ndimage.label(np.asarray(hu) > threshold, structure=_FULL)
    if n == 0:
        return False
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    in_region = np.bincount(lab[region].ravel(), minlength=n + 1)
    ok = (sizes[1:] >= min_voxels) & (in_region[1:] >= inside * sizes[1:])
    return bool(ok.any())


def hu_w1(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance (HU) between two samples of HU values (1D, any lengths): the mean shift
    needed to turn one distribution into the other (``scipy.stats.wasserstein_distance``)."""
    from scipy.stats import wasserstein_distance

    a, b = np.ravel(a), np.ravel(b)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"hu_w1 needs values on both sides, got {a.size} and {b.size}")
    return float(wasserstein_distance(a, b))


class HUSampler:
    """Collects HU values of a set of volumes for :func:`hu_w1`, at most ``per_volume`` per volume.

    Volumes with more selected voxels than ``per_volume`` contribute a seeded random subset (seed,
    volume index), so the pooled sample stays bounded for paper-sized sets; smaller ones contribute all.
    """

    def __init__(self, per_volume: int = 200_000, seed: int = 0):
        self.per_volume, self.seed, self.parts, self.n = int(per_volume), int(seed), [], 0

    def add(self, hu: np.ndarray, where: np.ndarray) -> None:
        v = np.asarray(hu, dtype=np.float32)[where]
        if v.size > self.per_volume:
            v = np.random.default_rng([self.seed, self.n]).choice(v, self.per_volume, replace=False)
        self.parts.append(v)
        self.n += 1

    def values(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson score interval ``[low, high]`` of a proportion ``successes / n`` (SciPy's ``binomtest``)."""
    from scipy.stats import binomtest

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


@dataclasses.dataclass
class AnatomyReference:
    """What the real windows allow: presence ranges, the body-fraction range and the spine region.

    Built once from the held-out real windows (:meth:`from_real`); :meth:`check` scores one volume,
    :meth:`summarize` turns the per-volume results of a set into fractions.
    """

    body_range: tuple[float, float]
    spine: np.ndarray
    bone_min_voxels: int
    ranges: dict[str, tuple[int, int]] | None = None

    @classmethod
    def from_real(cls, real_hu: list[np.ndarray], real_labels: list[np.ndarray] | None = None, *,
                  bone_min_fraction: float = 0.1, spine_dilate: int = 2) -> "AnatomyReference":
        """``real_hu``: HU volumes ``(D, H, W)`` of the real windows; ``real_labels``: the segmenter's label maps
        of the same windows (None: no presence check). The spine region is :func:`spine_region` (dilated by
        ``spine_dilate`` voxels); the minimum bone component is ``bone_min_fraction`` of the spine core (the
        voxels that are bone in at least half of the real windows, before dilation), at least 1 voxel."""
        if not real_hu:
            raise ValueError("AnatomyReference needs at least one real window")
        fr = [body_fraction(h) for h in real_hu]
        core = spine_region(real_hu, dilate=0)
        spine = ndimage.binary_dilation(core, structure=_FULL, iterations=spine_dilate) if core.any() and spine_dilate else core
        ranges = presence_ranges([structure_voxels(lab) for lab in real_labels]) if real_labels is not None else None
        return cls(body_range=(min(fr), max(fr)), spine=spine, bone_min_voxels=max(1, int(round(bone_min_fraction * core.sum()))),
                   ranges=ranges)

    def check(self, hu: np.ndarray, labels: np.ndarray | None = None, *, body: np.ndarray | None = None) -> dict[str, Any]:
        """One volume: ``body_fraction``, ``body_ok``, ``bone_ok`` and (with ``labels``) ``present`` per structure.
        ``body``: the volume's :func:`body_component` when the caller has it already."""
        if hu.shape != self.spine.shape:
            raise ValueError(f"volume of shape {hu.shape}, but the real windows are {self.spine.shape}")
        f = float((body_component(hu) if body is None else body).mean())
        out: dict[str, Any] = {"body_fraction": f, "body_ok": bool(self.body_range[0] <= f <= self.body_range[1]),
                               "bone_ok": bool(self.spine.any() and has_spine_bone(hu, self.spine, min_voxels=self.bone_min_voxels))}
        if labels is not None and self.ranges is not None:
            out["present"] = present(structure_voxels(labels), self.ranges)
        return out

    @staticmethod
    def summarize(checks: list[dict[str, Any]], *, n_boot: int = 0, seed: int = 0) -> dict[str, Any]:
        """Fractions over a set: ``body_ok_fraction``, ``bone_ok_fraction`` and ``anatomy`` (present fraction per
        structure and ``mean_liver_kidney_spleen``) when the checks hold ``present``.

        ``n_boot > 0`` adds 95 % intervals: ``*_fraction_ci95`` (Wilson score intervals of a proportion: a
        percentile bootstrap of 16 of 16 successes is the empty interval [1, 1]) and, for the mean over the three
        structures, ``mean_liver_kidney_spleen_ci95`` (volumes resampled, ``n_boot`` replicates, seeded)."""
        if not checks:
            raise ValueError("summarize needs at least one checked volume")
        n = len(checks)
        out: dict[str, Any] = {"body_ok_fraction": float(np.mean([c["body_ok"] for c in checks])),
                               "bone_ok_fraction": float(np.mean([c["bone_ok"] for c in checks]))}
        if n_boot:
            out["body_ok_fraction_ci95"] = wilson_interval(sum(c["body_ok"] for c in checks), n)
            out["bone_ok_fraction_ci95"] = wilson_interval(sum(c["bone_ok"] for c in checks), n)
        if all("present" in c for c in checks):
            frac = {s: float(np.mean([c["present"][s] for c in checks])) for s in STRUCTURES}
            mean_key = "mean_" + "_".join(CORE_STRUCTURES)
            out["anatomy"] = {"present_fraction": frac, mean_key: float(np.mean([frac[s] for s in CORE_STRUCTURES]))}
            if n_boot:
                from lad.evaluation.uncertainty import bootstrap_ci

                out["anatomy"]["present_fraction_ci95"] = {s: wilson_interval(sum(c["present"][s] for c in checks), n)
                                                           for s in STRUCTURES}
                per_volume = np.array([[c["present"][s] for s in CORE_STRUCTURES] for c in checks], np.float64)
                out["anatomy"][mean_key + "_ci95"] = bootstrap_ci(lambda x: float(x.mean()), [per_volume],
                                                                   out["anatomy"][mean_key], n_boot=n_boot, seed=seed)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The reference's settings for ``metrics.json`` (the spine region as its bounding box and size)."""
        box = ndimage.find_objects(self.spine.astype(np.int8))
        return {"body_hu": BODY_HU, "bone_hu": BONE_HU, "body_fraction_range": list(self.body_range),
                "spine_region_voxels": int(self.spine.sum()),
                "spine_region_box": [[s.start, s.stop] for s in box[0]] if box and box[0] else None,
                "bone_min_voxels": self.bone_min_voxels,
                "presence_ranges_voxels": {s: list(r) for s, r in self.ranges.items()} if self.ranges else None}
