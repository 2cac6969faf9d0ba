"""Preview of a sample folder: axial slices (8, 16, 24 as the paper's Figure 5) with masks overlaid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lad.sampling.writer import SampleFolder

__all__ = ["write_preview", "slice_indices"]


def slice_indices(depth: int) -> list[int]:
    """Slices 8, 16, 24 for depth 32 (the paper's Figure 5); the same fractions for other depths."""
    return sorted({min(depth - 1, round(depth * f)) for f in (0.25, 0.5, 0.75)})


def _load(folder: SampleFolder, rec: dict) -> tuple[np.ndarray, np.ndarray]:
    ct, mask = (folder.root / rec["files"]["ct"]), (folder.root / rec["files"]["mask"])
    if ct.suffix == ".npy":
        return np.load(ct), np.load(mask)
    import SimpleITK as sitk

    from lad.data.io import canonicalize, read_image

    return (sitk.GetArrayFromImage(canonicalize(read_image(ct))), sitk.GetArrayFromImage(canonicalize(read_image(mask))))


def write_preview(out: str | Path, *, max_samples: int = 6, window: tuple[float, float] = (-160.0, 240.0)) -> Path:
    """Write ``OUT/preview.png``: rows = samples, columns = slices; organ (1) and tumour (2) contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = SampleFolder(out)
    records = folder.read_manifest()[:max_samples]
    if not records:
        raise ValueError(f"{out}: no finished samples to preview")
    first_ct, _ = _load(folder, records[0])
    cols = slice_indices(first_ct.shape[0])
    fig, axes = plt.subplots(len(records), len(cols), figsize=(2.6 * len(cols), 2.6 * len(records)), squeeze=False)
    for r, rec in enumerate(records):
        ct, mask = _load(folder, rec)
        for c, z in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(ct[z], cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
            for label, color in ((1, "#00e5ff"), (2, "#ff3d00")):
                if (mask[z] == label).any():
                    ax.contour(mask[z] == label, levels=[0.5], colors=color, linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"slice {z}", fontsize=9)
            if c == 0:
                ax.set_ylabel(rec["id"], fontsize=8)
    fig.suptitle("lad samples (cyan: organ condition, red: tumour)", fontsize=10)
    fig.tight_layout()
    path = Path(out) / "preview.png"
    from lad.utils.atomic import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path
