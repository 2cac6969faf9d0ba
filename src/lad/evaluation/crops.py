"""The localized crop of paper section 4.2: the maximum bounding box of the organ over the original masks.

"Localized" FID / MMD are computed on sub-volumes cut by one fixed box: the union of the organ's
(labels 1 and 2: organ + tumour) bounding boxes over the ORIGINAL (real, un-augmented) mask set.
The same box is applied to real and synthetic volumes, so both sets are compared on the same region
and with the same shape (the feature network sees identical input sizes).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["max_bounding_box", "apply_box"]

Box = tuple[slice, slice, slice]


def max_bounding_box(masks: Iterable[Any], labels: Sequence[int] = (1, 2)) -> Box:
    """Union of the bounding boxes of ``labels`` over ``masks``.

    Args:
        masks: iterable of ``(D, H, W)`` (or ``(1, D, H, W)``) integer label arrays, all the same shape.
        labels: label values that count as the organ (Lad mask: 1 organ, 2 tumour).
    Returns:
        ``(slice_d, slice_h, slice_w)`` in voxels, stop exclusive.
    Raises:
        ValueError: masks of different shapes, or no label voxel in any mask.
    """
    lo = hi = shape = None
    for i, m in enumerate(masks):
        m = np.asarray(m)
        if m.ndim == 4 and m.shape[0] == 1:
            m = m[0]
        if m.ndim != 3:
            raise ValueError(f"mask {i}: expected (D, H, W), got shape {m.shape}")
        if shape is None:
            shape = m.shape
        elif m.shape != shape:
            raise ValueError(f"mask {i}: shape {m.shape} differs from the first mask's {shape}; the localized box needs one grid")
        fg = np.isin(m, labels)
        if not fg.any():
            continue
        axes = [np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        m_lo, m_hi = np.array([x[0] for x in axes]), np.array([x[-1] for x in axes])
        lo = m_lo if lo is None else np.minimum(lo, m_lo)
        hi = m_hi if hi is None else np.maximum(hi, m_hi)
    if lo is None:
        raise ValueError(f"no voxel with labels {tuple(labels)} in any mask: cannot define the localized crop")
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))  # type: ignore[return-value]


def apply_box(volume: Any, box: Box) -> Any:
    """Crop the last three axes of ``volume`` (``(..., D, H, W)``, numpy or torch) with ``box``.

    Raises ValueError when the box does not lie inside the volume (a synthetic set on another grid).
    """
    shape = tuple(volume.shape[-3:])
    for s, n in zip(box, shape):
        if s.start < 0 or s.stop > n:
            raise ValueError(f"localized box {[(b.start, b.stop) for b in box]} does not fit a volume of spatial shape {shape}")
    return volume[(..., *box)]
