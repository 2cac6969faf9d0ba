"""Procedural abdominal CT phantom: the embedded dataset every command runs on with no download.

Each subject is drawn from its own seed (``derive_seed(seed, index)``), so subject ``k`` is the same
whatever ``N`` is. Anatomy (``lad.data.phantom_anatomy``): body contour with skin, subcutaneous fat,
muscle wall and linea alba; vertebral bodies with discs, posterior elements, canal, paraspinal and
psoas muscles, ribs; lung bases in the costophrenic recesses of the top slices; liver (right, dome
near the top slice, left lobe anterior, hepatic vessels, gallbladder); spleen (left, posterior);
two kidneys (cortex brighter than medulla, sinus fat, right one lower); pancreas as a curved tube:
head by the duodenum right of midline, body anterior to the aorta, tail to the splenic hilum;
aorta and IVC; stomach with an air-fluid level, colon frame with mottled stool and gas, small-bowel
loops with fluid or gas, mesenteric vessels; optionally a hypo-dense pancreatic tumour and liver
lesions. A smooth random displacement field deforms everything; habitus, sizes, positions and the
number of slices vary.

HU (portal-venous-like phase; nominal values in ``HU``): fat -100, muscle 45, liver 60, spleen 50,
pancreas 40, tumour 16-28, kidney cortex 155-185 / medulla 95, bone 250-800, air -1000; then a slight
blur and spatially correlated noise (sigma 11-17 HU).

Default geometry: 1.5 x 1.5 x 2.5 mm on a 256 x 256 grid (384 mm field of view), 215-275 mm along
z (86-110 slices) from just above the liver dome to below the kidneys' lower poles; the pancreas
lies 60-150 mm below the top slice, well inside.

Labels (AbdomenCT-1K): 1 liver, 2 kidney, 3 spleen, 4 pancreas, plus 5 pancreatic tumour (our
extension; AbdomenCT-1K has no tumour label). Files in the AbdomenCT-1K layout:
``Case_XXXXX_0000.nii.gz`` (int16 HU) and ``Case_XXXXX.nii.gz`` (uint8 labels), written through
``lad.data.io.write_nifti`` so the affine is RAS-correct and lad's reader (SimpleITK -> DICOMOrient
"LPS") gives back exactly ``generate_subject``'s (D, H, W) arrays.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from lad.data.phantom_anatomy import HU, affine_for, paint_anatomy
from lad.utils.atomic import prepare_output_dir
from lad.utils.log import get_logger, progress
from lad.utils.seed import derive_seed

__all__ = ["PhantomSubject", "generate_subject", "write_phantom_dataset", "write_preview", "HU"]

log = get_logger(__name__)

@dataclasses.dataclass
class PhantomSubject:
    """``hu`` int16 (D, H, W) in the canonical orientation; ``labels`` uint8 (D, H, W); ``affine`` (d,h,w)->RAS mm."""

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    has_tumor: bool


def generate_subject(
    seed: int,
    *,
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.5),
    size: tuple[int, int] = (256, 256),
    n_slices: int | None = None,
    tumor: bool | None = None,
    lesions: bool | None = None,
    tumor_fraction: float = 0.3,
) -> PhantomSubject:
    """One phantom subject from ``seed`` on a grid of ``size`` (H, W) x ``n_slices`` at ``spacing`` (x, y, z) mm."""
    rng = np.random.default_rng(seed)
    sx, sy, sz = spacing
    if n_slices is None:
        n_slices = int(round(rng.uniform(215.0, 275.0) / sz))
    shape = (int(n_slices), int(size[0]), int(size[1]))
    if tumor is None:
        tumor = bool(rng.random() < tumor_fraction)
    if lesions is None:
        lesions = bool(rng.random() < 0.3)
    hu, lab, tumor = paint_anatomy(shape, spacing, rng, tumor=tumor, lesions=lesions)

    # acquisition: slight blur, then spatially correlated noise
    hu = ndimage.gaussian_filter(hu, sigma=(0.3, 0.7, 0.7))
    noise = ndimage.gaussian_filter(rng.normal(0, 1, size=shape).astype(np.float32), sigma=(0.4, 0.9, 0.9))
    noise *= rng.uniform(11, 17) / max(float(noise.std()), 1e-6)
    hu = np.clip(hu + noise, -1024, 3071)
    return PhantomSubject(hu=np.rint(hu).astype(np.int16), labels=lab, affine=affine_for(shape, spacing),
                          spacing=tuple(float(x) for x in spacing), has_tumor=bool(tumor))


def _init_worker() -> None:
    """One intra-op thread per pool worker: ``workers`` processes already use the cores."""
    import torch

    torch.set_num_threads(1)


def _write_one(args) -> str:
    out, index, subject_seed, kwargs = args
    from lad.data.io import write_nifti

    subj = generate_subject(subject_seed, **kwargs)
    case = f"Case_{index + 1:05d}"
    write_nifti(subj.hu, subj.affine, Path(out) / f"{case}_0000.nii.gz")
    write_nifti(subj.labels, subj.affine, Path(out) / f"{case}.nii.gz")
    return case


def write_phantom_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    tumor_fraction: float = 0.3,
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.5),
    size: tuple[int, int] = (256, 256),
    preview: bool = False,
    overwrite: bool = False,
    workers: int = 1,
    progress_bar: bool = True,
) -> list[Path]:
    """Write ``n`` phantom subjects in the AbdomenCT-1K layout into ``out_dir``; returns the image paths.

    Subject ``i`` (``Case_{i+1:05d}``) comes from ``derive_seed(seed, i)``: the same whatever ``n`` and
    ``workers`` are; it has a pancreatic tumour with probability ``tumor_fraction``. Files are written
    atomically (temp name, then rename). An existing non-empty ``out_dir`` raises ``OutputExistsError``
    unless ``overwrite``. ``preview`` also writes ``out_dir/preview.png`` (first 4 subjects).
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if not 0.0 <= tumor_fraction <= 1.0:
        raise ValueError(f"--tumor-fraction must be in [0, 1], got {tumor_fraction}")
    if len(spacing) != 3 or min(spacing) <= 0 or len(size) != 2 or min(size) < 16:
        raise ValueError(f"--spacing needs 3 positive mm values and --size 2 values >= 16, got {spacing} and {size}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    out = prepare_output_dir(out_dir, overwrite=overwrite)
    kwargs = {"spacing": tuple(spacing), "size": tuple(size), "tumor_fraction": tumor_fraction}
    jobs = [(str(out), i, derive_seed(seed, i), kwargs) for i in range(n)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
            cases = list(progress(pool.map(_write_one, jobs), total=n, desc="phantom", unit="subject", disable=not progress_bar))
    else:
        cases = [_write_one(j) for j in progress(jobs, desc="phantom", unit="subject", disable=not progress_bar)]
    if preview:
        write_preview(out, cases[: min(4, n)])
    return [out / f"{c}_0000.nii.gz" for c in cases]


def write_preview(out: str | Path, cases: list[str], window=(-160.0, 240.0)) -> Path:
    """PNG montage: axial slices through liver, pancreas and kidneys plus a coronal slice per subject."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from lad.data.io import canonicalize, read_image

    out = Path(out)
    fig, axes = plt.subplots(len(cases), 4, figsize=(13, 3.3 * len(cases)), squeeze=False)
    colors = {1: "#ffb300", 2: "#00e676", 3: "#d500f9", 4: "#00e5ff", 5: "#ff1744"}
    for r, case in enumerate(cases):
        img = canonicalize(read_image(out / f"{case}_0000.nii.gz"))
        hu = sitk.GetArrayFromImage(img)
        lab = sitk.GetArrayFromImage(canonicalize(read_image(out / f"{case}.nii.gz")))
        sz, sy = img.GetSpacing()[2], img.GetSpacing()[1]
        picks = []
        for organ, q in ((1, 0.75), (4, 0.5), (2, 0.5)):  # upper liver, mid pancreas, kidney hila
            zs = np.flatnonzero((lab == organ).any(axis=(1, 2)))
            picks.append(int(zs[int(len(zs) * q)]) if zs.size else hu.shape[0] // 2)
        for c, z in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(hu[z], cmap="gray", vmin=window[0], vmax=window[1])
            for k, col in colors.items():
                if (lab[z] == k).any():
                    ax.contour(lab[z] == k, levels=[0.5], colors=col, linewidths=0.7)
            ax.set_title(f"{case} axial z={z}", fontsize=8)
            ax.axis("off")
        ax = axes[r][3]
        h = int(np.argwhere(lab == 4)[:, 1].mean()) if (lab == 4).any() else hu.shape[1] // 2  # through the pancreas
        ax.imshow(hu[::-1, h, :], cmap="gray", vmin=window[0], vmax=window[1], aspect=sz / img.GetSpacing()[0])
        ax.set_title(f"{case} coronal", fontsize=8)
        ax.axis("off")
    fig.suptitle("lad phantom (window [-160, 240] HU; liver orange, kidney green, spleen violet, pancreas cyan, tumour red)", fontsize=9)
    fig.tight_layout()
    from lad.utils.atomic import atomic_path

    path = out / "preview.png"
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
