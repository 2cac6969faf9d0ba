"""Locality Condition Augmentation (paper section 3.4.1): flip, random affine, random elastic.

Following torchio's habit, a random draw only produces a parameter record (plain JSON-able dict);
a deterministic twin applies it. Each sample's record is drawn from its own seed, written to the
sample manifest, and ``apply_augmentation(mask, params)`` regenerates that exact mask later.

The geometry itself is MONAI's (``monai.transforms.Affine`` and ``Rand3DElastic`` with its random
state fixed by the recorded seed). Labels are warped as one-hot channels with trilinear
interpolation and re-labelled by arg-max, which keeps thin structures (pancreas) smoother than
nearest-neighbour warping; tumour voxels (label 2) are then kept inside the warped organ + tumour
region, so a tumour never leaves its organ.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from lad.utils.log import get_logger

__all__ = ["AugmentConfig", "draw_augmentation", "apply_augmentation", "augment_mask", "NO_AUGMENTATION"]

NO_AUGMENTATION: dict[str, Any] = {"kind": "none"}

log = get_logger(__name__)


@dataclasses.dataclass
class AugmentConfig:
    """Parameters of the condition augmentation (all in the mask's (D, H, W) voxel frame).

    Defaults follow the paper (flip + affine + elastic; section 3.4.1 names no magnitudes) with the
    magnitudes MAISI uses for mask augmentation: small in-plane rotation, scale and translation, elastic
    sigma 5-8 and magnitude 100-200 voxels at 256 x 256 in-plane (scaled here by ``elastic_reference_size``).
    A record keeps its angles, so manifests written before the rotation axis was corrected (their third
    entry tilted the volume) still replay exactly.
    """

    flip_prob: float = 0.5
    """Probability of a left-right flip (W axis). A left-right flip mirrors the anatomy; set 0 to keep situs."""
    rotate_range: tuple[float, float, float] = (math.radians(15), 0.0, 0.0)
    """Maximum absolute rotation in radians about the D, H and W axes (MONAI's ``Affine(rotate_params=...)``:
    entry ``i`` rotates in the plane of the other two axes). The first rotates within each axial (H-W) slice;
    the second and third tilt the volume through its slices (D-W and D-H planes)."""
    scale_range: tuple[float, float, float] = (0.0, 0.1, 0.1)
    """Maximum relative scale change per axis (0.1 = +-10 %)."""
    translate_range: tuple[float, float, float] = (0.0, 0.05, 0.05)
    """Maximum translation per axis as a fraction of the axis length."""
    elastic_prob: float = 1.0
    elastic_sigma: tuple[float, float] = (5.0, 8.0)
    elastic_magnitude: tuple[float, float] = (100.0, 200.0)
    elastic_reference_size: int = 256
    """In-plane size the elastic sigma/magnitude refer to; both scale with H / this value."""
    min_organ_fraction: float = 0.5
    """A warped mask keeping less than this fraction of its organ + tumour voxels is redrawn."""
    max_redraws: int = 10
    on_failure: str = "identity"
    """When every draw lost too much organ (e.g. a fragmented predicted mask): "identity" keeps the mask
    unaugmented, logs a warning and records ``{"kind": "none", "fallback": True}``; "error" raises."""


def draw_augmentation(config: AugmentConfig, shape: tuple[int, int, int], seed: int) -> dict[str, Any]:
    """Draw one augmentation record for a mask of ``shape`` (D, H, W) from ``seed`` (no geometry applied)."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    rel = h / float(config.elastic_reference_size)
    params: dict[str, Any] = {
        "kind": "locality",
        "flip_w": bool(rng.random() < config.flip_prob),
        "rotate": [float(rng.uniform(-r, r)) for r in config.rotate_range],
        "scale": [float(1.0 + rng.uniform(-s, s)) for s in config.scale_range],
        "translate": [float(rng.uniform(-t, t) * n) for t, n in zip(config.translate_range, shape)],
        "elastic": None,
    }
    if rng.random() < config.elastic_prob:
        params["elastic"] = {
            "sigma": float(rng.uniform(*config.elastic_sigma) * rel),
            "magnitude": float(rng.uniform(*config.elastic_magnitude) * rel),
            "seed": int(rng.integers(0, 2**31 - 1)),
        }
    return params


def _one_hot(mask: np.ndarray, num_labels: int = 3) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(mask)).long()
    return torch.nn.functional.one_hot(t, num_labels).permute(3, 0, 1, 2).float()


def apply_augmentation(mask: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Apply a recorded augmentation to ``mask`` (D, H, W) uint8 in {0, 1, 2}; deterministic.

    Returns a uint8 (D, H, W) mask on the same grid, tumour (2) confined to the warped organ region.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (D, H, W), got shape {mask.shape}")
    if params.get("kind", "none") == "none":
        return mask.astype(np.uint8, copy=True)
    from monai.transforms import Affine, Rand3DElastic

    x = _one_hot(mask)
    if params["flip_w"]:
        x = torch.flip(x, dims=[3])
    affine = Affine(
        rotate_params=params["rotate"],
        scale_params=params["scale"],
        translate_params=params["translate"],
        mode="bilinear",
        padding_mode="zeros",
        image_only=True,
    )
    x = affine(x)
    el = params.get("elastic")
    if el:
        elastic = Rand3DElastic(
            sigma_range=(el["sigma"], el["sigma"]),
            magnitude_range=(el["magnitude"], el["magnitude"]),
            prob=1.0,
            mode="bilinear",
            padding_mode="zeros",
        )
        elastic.set_random_state(seed=el["seed"])
        x = elastic(x)
    x = torch.as_tensor(x)
    # voxels pushed in from outside the field carry zeros in every channel: they are background
    x[0] = torch.where(x.sum(0) < 1e-6, torch.ones_like(x[0]), x[0])
    out = x.argmax(0).numpy().astype(np.uint8)
    # tumour stays inside the warped organ + tumour region (foreground = 1 - background probability)
    foreground = (1.0 - x[0]).numpy() >= 0.5
    out[(out == 2) & ~foreground] = 0
    return out


def augment_mask(
    mask: np.ndarray, config: AugmentConfig, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw and apply an augmentation; redraw (up to ``max_redraws``) when the organ mostly vanished.

    Returns ``(augmented_mask, record)``; ``record["seed"]`` and ``record["redraws"]`` say which draw
    was kept, and ``apply_augmentation(mask, record)`` reproduces the output exactly.
    """
    fg_before = int((mask > 0).sum())
    record: dict[str, Any] = {}
    for attempt in range(config.max_redraws + 1):
        draw_seed = int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])
        record = draw_augmentation(config, tuple(mask.shape), draw_seed)
        out = apply_augmentation(mask, record)
        if fg_before == 0 or (out > 0).sum() >= config.min_organ_fraction * fg_before:
            record.update(seed=draw_seed, redraws=attempt)
            return out, record
    msg = (f"condition augmentation removed more than {1 - config.min_organ_fraction:.0%} of the organ in "
           f"{config.max_redraws + 1} draws (seed {seed})")
    if config.on_failure == "error":
        raise ValueError(f"{msg}; reduce the affine/elastic ranges")
    if config.on_failure != "identity":
        raise ValueError(f"AugmentConfig.on_failure must be 'identity' or 'error', got {config.on_failure!r}")
    log.warning("%s; this sample keeps its mask unaugmented (a small or fragmented organ mask?)", msg)
    return mask.astype(np.uint8, copy=True), {"kind": "none", "fallback": True, "seed": int(seed),
                                                "redraws": config.max_redraws + 1}
