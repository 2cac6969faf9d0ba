"""Felzenszwalb superpixel pseudolabels per axial slice inside a body mask (SSL-ALPNet's self-supervision).

Ouyang et al. compute ``skimage.segmentation.felzenszwalb(slice, min_size=400, sigma=1)`` on each
axial slice and keep the superpixels of the body (foreground) only. Here:

* ``body_mask``: voxels above ``threshold_hu`` (-500 HU: air and the table's foam are below), the
  largest connected component per slice, holes filled (``scipy.ndimage``);
* ``slice_superpixels``: Felzenszwalb labels, set to 0 outside the body, renumbered 1..K.
"""

from __future__ import annotations

import numpy as np

from lad.data.labels import HU_MAX, HU_MIN

__all__ = ["body_mask", "slice_superpixels", "volume_superpixels"]


def _hu_to_unit(hu: float) -> float:
    return (float(np.clip(hu, HU_MIN, HU_MAX)) - HU_MIN) / (HU_MAX - HU_MIN)


def body_mask(image: np.ndarray, *, threshold_hu: float = -500.0) -> np.ndarray:
    """Body mask of ``image``: ``(H, W)`` or ``(D, H, W)`` float in [0, 1] (HU [-1000, 400]) -> bool, same shape.

    Per axial slice: ``image > threshold``, the largest 2D connected component, holes filled.
    """
    from scipy import ndimage

    img = np.asarray(image)
    if img.ndim == 3:
        return np.stack([body_mask(s, threshold_hu=threshold_hu) for s in img])
    if img.ndim != 2:
        raise ValueError(f"body_mask expects a (H, W) slice or a (D, H, W) volume, got shape {img.shape}")
    fg = img > _hu_to_unit(threshold_hu)
    lab, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(lab == int(np.argmax(sizes)))


def slice_superpixels(image: np.ndarray, body: np.ndarray, *, min_size: int = 400, sigma: float = 1.0,
                      scale: float = 1.0) -> np.ndarray:
    """Superpixel labels of one slice: ``image`` (H, W) float in [0, 1], ``body`` (H, W) bool -> (H, W) int32.

    0 outside the body; the superpixels inside it are numbered 1..K (Felzenszwalb segments cut by the
    body mask; a segment that straddles the body border keeps only its inside part).
    """
    from skimage.segmentation import felzenszwalb

    seg = felzenszwalb(np.asarray(image, dtype=np.float64), scale=scale, sigma=sigma, min_size=int(min_size)) + 1
    seg = np.where(body, seg, 0)
    _, inverse = np.unique(seg, return_inverse=True)  # renumber consecutively; 0 stays 0 (smallest value)
    out = inverse.reshape(seg.shape).astype(np.int32)
    if not (seg == 0).any():
        out += 1
    return out


def volume_superpixels(volume: np.ndarray, *, min_size: int = 400, sigma: float = 1.0, scale: float = 1.0,
                       threshold_hu: float = -500.0) -> tuple[np.ndarray, np.ndarray]:
    """Superpixels of every axial slice: ``volume`` (D, H, W) float in [0, 1] -> (labels (D, H, W) int32, body bool)."""
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume_superpixels expects (D, H, W), got shape {vol.shape}")
    body = body_mask(vol, threshold_hu=threshold_hu)
    labels = np.stack([slice_superpixels(s, b, min_size=min_size, sigma=sigma, scale=scale) for s, b in zip(vol, body)])
    return labels, body
