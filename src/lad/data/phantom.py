"""Procedural abdominal CT phantom: the embedded dataset every command runs on with no download.

Each subject is drawn from its own seed (``derive_seed(seed, index)``), so subject ``k`` is the
same whatever ``N`` is. Anatomy (positions in mm in the patient frame; see ``_anatomy``): body
contour with skin, subcutaneous fat and muscle wall; vertebral body, posterior elements, discs
and ribs; liver (right), spleen (left, posterior), two kidneys (cortex brighter than medulla),
pancreas as a curved head-body-tail tube anterior to the aorta, aorta and IVC, stomach with an
air-fluid level and bowel loops; optionally a hypo-dense pancreatic tumour and liver lesions.
A smooth random displacement field deforms every organ, and habitus, sizes and positions vary.

HU (contrast, portal-venous-like phase): fat -100, muscle 45, liver 60, spleen 50, pancreas 40,
tumour 15-30, kidney cortex 160 / medulla 90, bone 250-900, air -1000; correlated noise (sigma
about 15 HU) and slight blur.

Labels (AbdomenCT-1K): 1 liver, 2 kidney, 3 spleen, 4 pancreas, plus 5 pancreatic tumour (our
extension). Files in the AbdomenCT-1K layout: ``Case_XXXXX_0000.nii.gz`` (int16 HU) and
``Case_XXXXX.nii.gz`` (uint8 labels), RAS-correct affines.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from lad.utils.atomic import prepare_output_dir
from lad.utils.log import get_logger, progress
from lad.utils.seed import derive_seed

__all__ = ["PhantomSubject", "generate_subject", "write_phantom_dataset", "write_preview", "HU"]

log = get_logger(__name__)

HU = {
    "air": -1000.0, "fat": -100.0, "skin": 30.0, "muscle": 45.0, "visceral_fat": -90.0, "liver": 60.0,
    "liver_lesion": 25.0, "spleen": 50.0, "pancreas": 40.0, "tumor": 22.0, "kidney_cortex": 160.0,
    "kidney_medulla": 90.0, "aorta": 170.0, "ivc": 120.0, "bone_cortical": 800.0, "bone_cancellous": 260.0,
    "disc": 80.0, "bowel_wall": 45.0, "fluid": 12.0, "gas": -950.0,
}


@dataclasses.dataclass
class PhantomSubject:
    """``hu`` int16 (D, H, W) in the canonical orientation; ``labels`` uint8 (D, H, W); ``affine`` (d,h,w)->RAS mm."""

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    has_tumor: bool


class _Grid:
    """Deformed patient-frame coordinates of every voxel: u (mm, + towards patient left),
    v (mm, + towards posterior), t (mm below the top slice)."""

    def __init__(self, shape, spacing, rng, amplitude):
        import torch

        d, h, w = shape
        sx, sy, sz = spacing
        self.shape, self.spacing = shape, spacing
        self.margin = 3.0 * amplitude + 2.0 * max(spacing)
        t = (d - 1 - np.arange(d, dtype=np.float32)) * sz  # d=0 is inferior: t = distance below the top
        v = (np.arange(h, dtype=np.float32) - (h - 1) / 2) * sy
        u = (np.arange(w, dtype=np.float32) - (w - 1) / 2) * sx
        # smooth displacement: a coarse random field upsampled to the grid (torch's trilinear
        # interpolation: 20x faster here than scipy.ndimage.zoom on a 94x256x256 grid)
        coarse = torch.from_numpy(rng.normal(0, amplitude, size=(1, 3, 4, 5, 5)).astype(np.float32))
        disp = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0].numpy()
        self.t = t[:, None, None] + disp[0]
        self.v = v[None, :, None] + disp[1]
        self.u = u[None, None, :] + disp[2]

    def box(self, lo, hi) -> tuple[slice, slice, slice]:
        """Index slices (d, h, w) covering the patient-frame box [lo, hi] (u, v, t) plus the deformation margin."""
        d, h, w = self.shape
        sx, sy, sz = self.spacing
        m = self.margin
        w0, w1 = (lo[0] - m) / sx + (w - 1) / 2, (hi[0] + m) / sx + (w - 1) / 2
        h0, h1 = (lo[1] - m) / sy + (h - 1) / 2, (hi[1] + m) / sy + (h - 1) / 2
        d0, d1 = d - 1 - (hi[2] + m) / sz, d - 1 - (lo[2] - m) / sz
        clip = lambda a, b, n: slice(int(max(0, np.floor(a))), int(min(n, np.ceil(b) + 1)))
        return clip(d0, d1, d), clip(h0, h1, h), clip(w0, w1, w)

    def ellipsoid(self, c, axes) -> np.ndarray:
        """Normalised radius r (< 1 inside) of an axis-aligned ellipsoid centre (u, v, t), semi-axes mm."""
        out = np.full(self.shape, 9.0, dtype=np.float32)
        sl = self.box([c[i] - axes[i] for i in range(3)], [c[i] + axes[i] for i in range(3)])
        out[sl] = np.sqrt(((self.u[sl] - c[0]) / axes[0]) ** 2 + ((self.v[sl] - c[1]) / axes[1]) ** 2 + ((self.t[sl] - c[2]) / axes[2]) ** 2)
        return out

    def cylinder(self, c, axes) -> np.ndarray:
        """Normalised radius of a cranio-caudal elliptic cylinder centre (u, v)."""
        out = np.full(self.shape, 9.0, dtype=np.float32)
        big = 1e6
        sl = self.box([c[0] - axes[0], c[1] - axes[1], -big], [c[0] + axes[0], c[1] + axes[1], big])
        out[sl] = np.sqrt(((self.u[sl] - c[0]) / axes[0]) ** 2 + ((self.v[sl] - c[1]) / axes[1]) ** 2)
        return out

    def tube(self, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
        """Normalised distance to a polyline through ``points`` (K, 3) (u, v, t) with radii (K,)."""
        best = np.full(self.shape, 9.0, dtype=np.float32)
        rmax = float(radii.max())
        sl = self.box(points.min(0) - rmax, points.max(0) + rmax)
        u, v, t = self.u[sl], self.v[sl], self.t[sl]
        sub = best[sl]
        for p0, p1, r0, r1 in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
            seg = p1 - p0
            rel = [u - p0[0], v - p0[1], t - p0[2]]
            s = np.clip((rel[0] * seg[0] + rel[1] * seg[1] + rel[2] * seg[2]) / float(seg @ seg), 0, 1)
            dist = np.sqrt((rel[0] - s * seg[0]) ** 2 + (rel[1] - s * seg[1]) ** 2 + (rel[2] - s * seg[2]) ** 2)
            np.minimum(sub, dist / (r0 + s * (r1 - r0)), out=sub)
        best[sl] = sub
        return best


def _affine(shape, spacing) -> np.ndarray:
    d, h, w = shape
    sx, sy, sz = spacing
    a = np.zeros((4, 4))
    a[0, 2], a[1, 1], a[2, 0], a[3, 3] = -sx, -sy, sz, 1.0  # w -> patient left (RAS -x), h -> posterior (-y)
    a[:3, 3] = [(w - 1) / 2 * sx, (h - 1) / 2 * sy, -(d - 1) / 2 * sz]
    return a


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
        n_slices = int(round(rng.uniform(200.0, 270.0) / sz))
    shape = (int(n_slices), int(size[0]), int(size[1]))
    if tumor is None:
        tumor = bool(rng.random() < tumor_fraction)
    if lesions is None:
        lesions = bool(rng.random() < 0.3)
    g = _Grid(shape, spacing, rng, amplitude=rng.uniform(3.0, 7.0))
    hu = np.full(shape, HU["air"], dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)

    # body habitus
    a, b = rng.uniform(135, 170), rng.uniform(100, 130)
    fat = rng.uniform(10, 35)
    wall = rng.uniform(8, 14)
    body_v0 = rng.uniform(-8, 8)
    r_body = g.cylinder((0, body_v0), (a, b))
    hu[r_body < 1] = HU["skin"]
    hu[r_body < 1 - 2.5 / b] = HU["fat"]
    inner = g.cylinder((0, body_v0), (a - fat, b - fat))
    hu[inner < 1] = HU["muscle"]
    cavity = g.cylinder((0, body_v0), (a - fat - wall, b - fat - wall)) < 1
    hu[cavity] = HU["visceral_fat"]

    # spine: vertebral body, posterior elements, paraspinal muscles, discs every ~32 mm
    sv = body_v0 + b - fat - rng.uniform(55, 65)
    para = (g.cylinder((-30, sv + 35), (22, 20)) < 1) | (g.cylinder((30, sv + 35), (22, 20)) < 1)
    hu[para] = HU["muscle"]
    vb = g.cylinder((0, sv), (22, 18))
    disc = (np.mod(g.t + rng.uniform(0, 32), 32.0) < 7.0)
    hu[(vb < 1)] = HU["bone_cortical"]
    hu[(vb < 0.82)] = HU["bone_cancellous"]
    hu[(vb < 1) & disc] = HU["disc"]
    canal = g.cylinder((0, sv + 26), (9, 8)) < 1
    post = (g.cylinder((0, sv + 42), (6, 16)) < 1) | (g.cylinder((-14, sv + 28), (6, 7)) < 1) | (g.cylinder((14, sv + 28), (6, 7)) < 1)
    hu[post & ~disc] = HU["bone_cortical"] * 0.8
    hu[canal] = 20.0

    # ribs: arcs just inside the muscle wall, present in bands along z (upper abdomen)
    ang = np.arctan2(g.v - body_v0, g.u)
    ring = g.cylinder((0, body_v0), (a - fat - wall * 0.5, b - fat - wall * 0.5))
    rib_band = (np.mod(g.t + rng.uniform(0, 24), 24.0) < 10.0) & (g.t < rng.uniform(110, 140))
    dash = np.mod(ang + g.t / 60.0, 0.55) < 0.16
    rib = (np.abs(ring - 1) < 0.03) & rib_band & dash & ((ang > -0.2) | (ang < -2.9))
    hu[rib] = HU["bone_cortical"] * 0.75

    # vessels anterior to the spine
    av, ivc_u = sv - 32, -rng.uniform(22, 30)
    aorta = g.cylinder((rng.uniform(4, 14), av), (10.5, 10.5)) < 1
    ivc = g.cylinder((ivc_u, av + 2), (13, 9)) < 1

    # organs (each a deformed, randomly scaled ellipsoid or tube)
    s = rng.uniform(0.88, 1.12, size=8)
    liver_c = (-a * 0.42, body_v0 - 5 + rng.uniform(-8, 8), rng.uniform(70, 90))
    liver = g.ellipsoid(liver_c, (85 * s[0], 88 * s[0], 80 * s[1])) < 1
    liver &= ~(g.ellipsoid((liver_c[0] + 70, liver_c[1] - 40, liver_c[2] + 30), (45, 40, 60)) < 1)  # left-lobe taper
    liver &= cavity
    spleen_c = (a * 0.62, sv - 5 + rng.uniform(-6, 6), rng.uniform(60, 80))
    spleen = (g.ellipsoid(spleen_c, (24 * s[2], 42 * s[2], 50 * s[3])) < 1) & cavity
    kid_t = rng.uniform(125, 140)
    kidneys_r = []
    for side, dt in ((-1, 8.0), (1, -8.0)):
        kc = (side * rng.uniform(60, 72), sv + rng.uniform(5, 15), kid_t + dt)
        kidneys_r.append(g.ellipsoid(kc, (26 * s[4], 28 * s[4], 52 * s[5])))
    kidney = (kidneys_r[0] < 1) | (kidneys_r[1] < 1)
    kidney_cortex = ((kidneys_r[0] < 1) & (kidneys_r[0] > 0.72)) | ((kidneys_r[1] < 1) & (kidneys_r[1] > 0.72))

    # pancreas: head (right, near the duodenum) -> body (anterior to the aorta) -> tail (splenic hilum)
    pt = rng.uniform(95, 115)
    pts = np.array([
        [ivc_u - 5, av - 14, pt + 22],
        [ivc_u + 5, av - 26, pt + 10],
        [8, av - 30 + rng.uniform(-4, 4), pt],
        [a * 0.32, av - 20, pt - 8],
        [spleen_c[0] - 28, spleen_c[1] - 12, pt - 14],
    ], dtype=np.float32)
    radii = np.array([16, 12, 9, 8, 7], dtype=np.float32) * rng.uniform(0.85, 1.15)
    pancreas = g.tube(pts, radii) < 1

    # stomach (left upper quadrant, anterior) with an air-fluid level, bowel loops below the liver
    st_c = (a * 0.3, body_v0 - b * 0.45, rng.uniform(55, 75))
    st_r = g.ellipsoid(st_c, (45, 32, 45))
    stomach = (st_r < 1) & cavity
    air_level = st_c[1] - rng.uniform(5, 15)
    bowel_wall = np.zeros(shape, bool)
    bowel_gas = np.zeros(shape, bool)
    bowel_fluid = np.zeros(shape, bool)
    for _ in range(int(rng.integers(14, 22))):
        c = (rng.uniform(-a * 0.6, a * 0.6), body_v0 - rng.uniform(0, b * 0.7), rng.uniform(120, 280))
        r = g.ellipsoid(c, (rng.uniform(10, 18), rng.uniform(10, 16), rng.uniform(14, 30)))
        bowel_wall |= (r < 1)
        content = r < 0.72
        if rng.random() < 0.35:
            bowel_gas |= content
        else:
            bowel_fluid |= content

    # paint soft tissue in order (later wins), then labels
    occupied = liver | spleen | kidney | pancreas | aorta | ivc
    free = cavity & ~occupied
    hu[bowel_wall & free] = HU["bowel_wall"]
    hu[bowel_fluid & free] = HU["fluid"]
    hu[bowel_gas & free] = HU["gas"]
    hu[stomach & free] = HU["bowel_wall"]
    hu[(st_r < 0.86) & free] = HU["fluid"]
    hu[(st_r < 0.86) & free & (g.v < air_level)] = HU["gas"]
    hu[liver] = HU["liver"] + rng.uniform(-4, 4)
    hu[spleen] = HU["spleen"] + rng.uniform(-4, 4)
    hu[kidney] = HU["kidney_medulla"]
    hu[kidney_cortex] = HU["kidney_cortex"] + rng.uniform(-10, 20)
    hu[pancreas] = HU["pancreas"] + rng.uniform(-4, 4)
    hu[aorta] = HU["aorta"] + rng.uniform(-15, 15)
    hu[ivc] = HU["ivc"]
    lab[liver] = 1
    lab[kidney] = 2
    lab[spleen] = 3
    lab[pancreas] = 4
    if lesions:
        for _ in range(int(rng.integers(1, 4))):
            lc = (liver_c[0] + rng.uniform(-40, 40), liver_c[1] + rng.uniform(-40, 40), liver_c[2] + rng.uniform(-40, 40))
            les = (g.ellipsoid(lc, (rng.uniform(5, 12),) * 3) < 1) & liver
            hu[les] = HU["liver_lesion"]
    if tumor:
        k = rng.uniform(0.1, 0.9) * (len(pts) - 1)
        i0 = int(k)
        tc = pts[i0] + (k - i0) * (pts[i0 + 1] - pts[i0])
        tr = rng.uniform(7, 14)
        grown = ndimage.binary_dilation(pancreas, iterations=max(1, int(round(3.0 / sx))))
        tum = (g.ellipsoid(tc, (tr, tr * rng.uniform(0.8, 1.2), tr)) < 1) & grown
        if not tum.any():  # tiny grids: keep at least the nearest pancreas voxels
            tum = (g.ellipsoid(tc, (tr * 2,) * 3) < 1) & pancreas
        hu[tum] = HU["tumor"] + rng.uniform(-6, 6)
        lab[tum] = 5
        tumor = bool(tum.any())

    # acquisition: slight blur, then spatially correlated noise
    hu = ndimage.gaussian_filter(hu, sigma=(0.3, 0.7, 0.7))
    noise = ndimage.gaussian_filter(rng.normal(0, 1, size=shape).astype(np.float32), sigma=(0.4, 0.9, 0.9))
    noise *= rng.uniform(11, 17) / max(float(noise.std()), 1e-6)
    hu = np.clip(hu + noise, -1024, 3071)
    return PhantomSubject(hu=np.rint(hu).astype(np.int16), labels=lab, affine=_affine(shape, spacing),
                          spacing=tuple(float(x) for x in spacing), has_tumor=bool(tumor))


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
) -> list[Path]:
    """Write ``n`` phantom subjects in the AbdomenCT-1K layout into ``out_dir``; returns the image paths."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    out = prepare_output_dir(out_dir, overwrite=overwrite)
    kwargs = {"spacing": tuple(spacing), "size": tuple(size), "tumor_fraction": tumor_fraction}
    jobs = [(str(out), i, derive_seed(seed, i), kwargs) for i in range(n)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            cases = list(progress(pool.map(_write_one, jobs), total=n, desc="phantom", unit="subject"))
    else:
        cases = [_write_one(j) for j in progress(jobs, desc="phantom", unit="subject")]
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
        for organ in (1, 4, 2):
            zs = np.flatnonzero((lab == organ).any(axis=(1, 2)))
            picks.append(int(zs[len(zs) // 2]) if zs.size else hu.shape[0] // 2)
        for c, z in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(hu[z], cmap="gray", vmin=window[0], vmax=window[1])
            for k, col in colors.items():
                if (lab[z] == k).any():
                    ax.contour(lab[z] == k, levels=[0.5], colors=col, linewidths=0.7)
            ax.set_title(f"{case} axial z={z}", fontsize=8)
            ax.axis("off")
        ax = axes[r][3]
        h = int(np.flatnonzero((lab == 4).any(axis=(0, 2)))[0]) if (lab == 4).any() else hu.shape[1] // 2
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
