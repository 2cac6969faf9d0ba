"""Tumour synthesis into real CT by latent inpainting: ``lad sample --inpaint CT_DIR``.

The tumour-scaling supplement trains segmenters on real CT plus CT with synthetic tumours (its "extra 3x
synthetic data", Table 5), made as DiffTumor makes them (Chen et al., CVPR 2024): a tumour mask is placed
inside the organ of a real, healthy CT and a latent diffusion model fills that region of the CT, the rest
staying real. Here the model is a trained Lad run (paper sections 3.3-3.4), which was trained to generate
whole windows, not to inpaint; the region is filled with RePaint's latent replacement (Lugmayr et al.,
CVPR 2022), which needs no inpainting training. Per output ``j`` (seed ``derive_seed(seed, j)``):

1. a real window ``j % len(cases)`` of CT_DIR (tumour-free windows by default; ``cases="all"`` takes every
   window, an existing tumour stays labelled);
2. a tumour mask placed inside its organ (``tumour="ellipsoid"``: DiffTumor's ellipsoid of a drawn size
   class, randomly oriented, centred on a random organ voxel, cut to the organ; ``tumour="real"``: the
   tumour mask of another window of CT_DIR, flipped and moved so that one of its voxels lands on a random
   organ voxel, cut to the organ, redrawn while less than half of it stays inside);
3. the CT encoded with the run's VQ-GAN; the Lad sampler run with the condition of the new mask (organ +
   tumour) while, before every denoiser call, the latent outside the tumour region (the tumour dilated by
   ``blend_margin`` voxels, taken to the latent grid, dilated by ``latent_dilation`` cells) is replaced by the
   real latent noised to the current level with ``scheduler.add_noise`` (RePaint's known region), and after
   the last step by the real latent itself. Optional RePaint resampling: after every ``jump`` steps, go back
   ``jump`` steps by forward noising and denoise them again, ``resample - 1`` extra times;
4. decode, then paste back: ``out = w * generated + (1 - w) * real`` with ``w = 1 - dist / (blend_margin + 1)``
   for voxels within ``blend_margin`` voxels (Euclidean distance) of the tumour, 1 inside it and 0 beyond,
   so outside the dilated mask the output equals the input CT voxel for voxel;
5. the CT (HU, the input's geometry) and its label (the window's Lad mask with the placed tumour as label 2)
   written as an ordinary ``lad sample`` folder (``lad.sampling.writer``): resumable, shardable, atomic.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lad.utils.log import get_logger, progress
from lad.utils.seed import derive_seed

__all__ = ["InpaintSettings", "TUMOUR_SIZES_MM", "INPAINT_SAMPLERS", "CTCase", "CTSource", "ellipsoid_tumour", "real_tumour",
           "place_tumour", "blend_weights", "latent_region", "repaint_schedule", "known_noise_seed", "inpaint_latents",
           "inpaint_volumes", "generate_inpainted"]

log = get_logger(__name__)

# DiffTumor's / SynTumor's base radii of the tumour size classes (Hu et al. CVPR 2023, Chen et al. CVPR 2024:
# tiny 4, small 8, medium 16, large 32, each semi-axis drawn in [0.75, 1.25] x the base), there in voxels of a
# ~1 mm grid, here in mm so that a size class means the same on any spacing.
TUMOUR_SIZES_MM: dict[str, float] = {"tiny": 4.0, "small": 8.0, "medium": 16.0, "large": 32.0}
TUMOUR_SOURCES = ("ellipsoid", "real")
INPAINT_SAMPLERS = ("ddpm", "ddim", "euler")
CASE_CHOICES = ("healthy", "all")
_PAIR_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_IMAGE_TAGS = ("_image", "_ct")


@dataclasses.dataclass
class InpaintSettings:
    """Everything that decides the content of an inpainted sample folder (saved in ``sampling.json``)."""

    n: int = 16
    tumour: str = "ellipsoid"
    """Tumour masks: "ellipsoid" (DiffTumor's shapes, no tumour labels needed) or "real" (moved real tumour masks
    of CT_DIR's windows of the same split). Ours: the ellipsoid default (the supplement does not say which)."""
    tumour_sizes: tuple[str, ...] = ("tiny", "small", "medium", "large")
    """Size classes drawn with equal probability for ``tumour="ellipsoid"`` (``TUMOUR_SIZES_MM``)."""
    cases: str = "healthy"
    """"healthy": only windows without tumour voxels (label 2), as DiffTumor synthesises into healthy CT; "all"."""
    split: str = "train"
    """Windows of a prepared CT_DIR (and real tumour donors) taken from this split ("train" | "test"); a sample
    made from a test window is never used by ``lad downstream supervised`` (label leakage)."""
    latent_dilation: int = 1
    """Dilation (latent cells, 3x3x3 steps) of the generated region on the latent grid. Ours."""
    blend_margin: int = 2
    """Voxels around the tumour blended linearly between generated and real CT. Ours."""
    jump: int = 1
    """RePaint jump length (steps) of the resampling."""
    resample: int = 1
    """RePaint resampling count: every ``jump`` steps are denoised ``resample`` times; 1 = no resampling
    (ours; RePaint uses jump 10, resample 10 at 10x the denoiser calls)."""
    guidance: float | None = None
    """w of eq. (4); None: the run's ``sampling.guidance``."""
    sampler: str | None = None
    """"ddpm" | "ddim" (DDPM-trained runs) or "euler" (rectified-flow runs): one-step samplers, whose latent can be
    replaced between steps (not the multistep "dpmpp2m"); None: the run's ``sampling.sampler``."""
    steps: int | None = None
    """Sampling timesteps; None: the run's ``sampling.steps``."""
    seed: int = 0
    format: str = "nifti"  # "nifti" | "npy"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option for a bad setting (sampler / steps / guidance once resolved)."""
        if int(self.n) != self.n or self.n < 1:
            raise ValueError(f"--n must be a whole number >= 1, got {self.n}")
        if self.tumour not in TUMOUR_SOURCES:
            raise ValueError(f"--tumour must be one of {', '.join(TUMOUR_SOURCES)}, got {self.tumour!r}")
        bad = [s for s in self.tumour_sizes if s not in TUMOUR_SIZES_MM]
        if bad or not self.tumour_sizes:
            raise ValueError(f"--tumour-sizes must name some of {', '.join(TUMOUR_SIZES_MM)}, got {list(self.tumour_sizes)}")
        if self.cases not in CASE_CHOICES:
            raise ValueError(f"--inpaint-cases must be healthy or all, got {self.cases!r}")
        if self.split not in ("train", "test"):
            raise ValueError(f"--inpaint-split must be train or test, got {self.split!r}")
        for name, value, low in (("--latent-dilation", self.latent_dilation, 0), ("--blend-margin", self.blend_margin, 0),
                                 ("--jump", self.jump, 1), ("--resample", self.resample, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value}")
        if self.format not in ("nifti", "npy"):
            raise ValueError(f"--format must be nifti or npy, got {self.format!r}")


# ------------------------------------------------------------------------------------------------ real CT


@dataclasses.dataclass
class CTCase:
    """One real window: ``hu`` (D, H, W) float32 HU, ``mask`` (D, H, W) uint8 Lad mask {0, 1, 2}, ``affine`` (4, 4)
    (d, h, w) -> RAS mm, ``source`` ("CT_DIR:window_id" for a prepared dataset, else the CT file)."""

    id: str
    hu: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    source: str


class CTSource:
    """The real CT of ``--inpaint CT_DIR``: a prepared dataset (its ``split`` windows) or a folder of NIfTI/NRRD
    pairs ``<id>_image.nii.gz`` (or ``<id>_ct.nii.gz``) + ``<id>_mask.nii.gz`` (Lad mask: 0 background, 1 organ,
    2 tumour) on the model's grid, as ``lad export-window`` writes them. ``shape``: the model's (D, H, W)."""

    def __init__(self, path: str | Path, *, shape: Sequence[int], split: str = "train"):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: --inpaint CT folder does not exist")
        if not self.path.is_dir():
            raise ValueError(f"{self.path}: --inpaint needs a folder (a prepared dataset or NIfTI CT + mask pairs)")
        self._ds = None
        if (self.path / "manifest.json").exists():
            from lad.data.dataset import PreparedDataset

            self.kind = "prepared"
            self._ds = PreparedDataset(self.path, split=split, organ_labels=False)
            if tuple(self._ds.shape) != self.shape:
                raise ValueError(f"{self.path}: windows of shape {tuple(self._ds.shape)}, but the run's model works on "
                                 f"{self.shape}: prepare the CT with the run's prepare preset")
            self.ids = [w["id"] for w in self._ds.windows]
            if not self.ids:
                raise ValueError(f"{self.path}: the prepared dataset has no {split} windows (--inpaint-split)")
        else:
            self.kind = "pairs"
            self.pairs = self._find_pairs()
            self.ids = sorted(self.pairs)
        self._flags: dict[int, tuple[bool, bool]] = {}

    def _find_pairs(self) -> dict[str, tuple[Path, Path]]:
        files = {p.name: p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")}
        pairs = {}
        for name, p in sorted(files.items()):
            suffix = next((s for s in _PAIR_SUFFIXES if name.endswith(s)), None)
            stem = name[: -len(suffix)] if suffix else None
            tag = next((t for t in _IMAGE_TAGS if stem and stem.endswith(t)), None)
            if tag is None:
                continue
            case = stem[: -len(tag)]
            mask = next((files[case + "_mask" + s] for s in _PAIR_SUFFIXES if case + "_mask" + s in files), None)
            if mask is None:
                raise ValueError(f"{p}: no mask beside it (expected {case}_mask{suffix}: 0 background, 1 organ, 2 tumour)")
            if case in pairs:
                raise ValueError(f"{p}: case {case!r} has two CT files ({pairs[case][0].name} and {name})")
            pairs[case] = (p, mask)
        if not pairs:
            raise ValueError(f"{self.path}: no CT found: --inpaint takes a prepared dataset (manifest.json) or NIfTI pairs "
                             "<id>_image.nii.gz + <id>_mask.nii.gz on the model's grid (as `lad export-window` writes)")
        return pairs

    def __len__(self) -> int:
        return len(self.ids)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.ids[i]}" if self.kind == "prepared" else str(self.pairs[self.ids[i]][0])

    def __getitem__(self, i: int) -> CTCase:
        from lad.sampling.masks import _check_labels

        if self.kind == "prepared":
            r = self._ds.get_arrays(i, organs=False)
            hu, mask, affine = r["hu"], r["mask"], r["affine"]
        else:
            import SimpleITK as sitk

            from lad.data.io import affine_dhw_to_ras, read_pair

            ct_path, mask_path = self.pairs[self.ids[i]]
            img, lab = read_pair(ct_path, mask_path)  # both canonical, the mask aligned to the CT by geometry
            hu, mask, affine = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab), affine_dhw_to_ras(img)
            if tuple(hu.shape) != self.shape:
                raise ValueError(f"{ct_path}: CT of shape {tuple(hu.shape)}, but the run's model works on {self.shape} "
                                 "windows: prepare the CT with the run's prepare preset (lad prepare) and pass that folder")
        where = self.where(i)
        mask = _check_labels(np.asarray(mask), where)
        if not (mask == 1).any():
            raise ValueError(f"{where}: no organ in the mask (label 1): a tumour has nowhere to go; remove the case "
                             "or give its organ mask")
        return CTCase(id=self.ids[i], hu=np.asarray(hu, dtype=np.float32), mask=np.ascontiguousarray(mask),
                      affine=np.asarray(affine, dtype=np.float64), source=where)

    def flags(self, i: int) -> tuple[bool, bool]:
        """``(has organ, has tumour)`` of case ``i``, from the prepared manifest's voxel counts when it has them."""
        if i not in self._flags:
            counts = self._ds.windows[i].get("organ_voxels") if self.kind == "prepared" else None
            organ = self._ds.config.get("organ", "pancreas") if self.kind == "prepared" else None
            if counts and organ in counts and "tumor" in counts:  # Lad label 1 = the organ's voxels, tumour excluded
                self._flags[i] = (int(counts[organ]) > 0, int(counts["tumor"]) > 0)
            else:
                m = self.read_mask(i)
                self._flags[i] = (bool((m == 1).any()), bool((m == 2).any()))
        return self._flags[i]

    def read_mask(self, i: int) -> np.ndarray:
        if self.kind == "prepared":
            return self._ds.get_arrays(i, organs=False)["mask"]
        import SimpleITK as sitk

        from lad.data.io import canonicalize, read_image

        return sitk.GetArrayFromImage(canonicalize(read_image(self.pairs[self.ids[i]][1]), is_label=True))

    def fingerprint(self) -> str:
        """sha256 of every file the cases come from (relative path, size, modification time in ns)."""
        if self.kind == "prepared":
            patients = sorted({w["patient"] for w in self._ds.windows})
            files = [self.path / "manifest.json"] + [self.path / "patients" / p / f"{k}.npy" for p in patients
                                                     for k in ("image", "mask")]
        else:
            files = [f for case in self.ids for f in self.pairs[case]]
        from lad.sampling.masks import files_fingerprint

        return files_fingerprint(self.path, files)


# ------------------------------------------------------------------------------------------------ tumour masks


def _organ_voxels(mask: np.ndarray) -> np.ndarray:
    """(N, 3) indices of organ voxels (label 1) where a tumour may be centred."""
    idx = np.argwhere(mask == 1)
    if not len(idx):
        raise ValueError("no organ voxel (label 1) to place a tumour in")
    return idx


def ellipsoid_tumour(mask: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
                     sizes: Sequence[str] = tuple(TUMOUR_SIZES_MM)) -> tuple[np.ndarray, dict[str, Any]]:
    """An ellipsoid tumour inside the organ of the Lad ``mask`` (D, H, W).

    Size class drawn uniformly from ``sizes``; semi-axes ``base * U(0.75, 1.25)`` mm each (DiffTumor's draw);
    a uniformly random orientation; centred on a uniformly drawn organ voxel; cut to the organ (labels >= 1),
    the centre voxel always kept. ``spacing``: mm along (D, H, W). Returns ``(tumour (D, H, W) bool, record)``.
    """
    from scipy.spatial.transform import Rotation

    size = sizes[int(rng.integers(len(sizes)))]
    radii = TUMOUR_SIZES_MM[size] * rng.uniform(0.75, 1.25, 3)
    rot = Rotation.random(random_state=rng)
    centre = _organ_voxels(mask)[int(rng.integers(int((mask == 1).sum())))]
    sp = np.asarray(spacing, dtype=np.float64)
    reach = np.ceil(radii.max() / sp).astype(int)  # the ellipsoid's bounding box around the centre, in voxels
    lo = np.maximum(centre - reach, 0)
    hi = np.minimum(centre + reach + 1, mask.shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    local = ((grid - centre) * sp) @ rot.as_matrix()  # mm in the ellipsoid's own axes
    inside = (((local / radii) ** 2).sum(-1) <= 1.0)
    tumour = np.zeros(mask.shape, dtype=bool)
    tumour[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = inside
    tumour &= mask >= 1
    tumour[tuple(centre)] = True
    record = {"kind": "ellipsoid", "size": size, "radii_mm": [round(float(r), 4) for r in radii],
              "rotation_quat_xyzw": [round(float(q), 6) for q in rot.as_quat()], "centre": [int(c) for c in centre],
              "voxels": int(tumour.sum())}
    return tumour, record


def real_tumour(mask: np.ndarray, donor: np.ndarray, rng: np.random.Generator, *, donor_id: str = "",
                min_kept: float = 0.5, max_draws: int = 10) -> tuple[np.ndarray, dict[str, Any]]:
    """A real tumour mask ``donor`` (D, H, W) bool, flipped and moved into the organ of the Lad ``mask``.

    Per draw: a flip of each axis with probability 0.5, then a shift that puts a uniformly drawn donor voxel on
    a uniformly drawn organ voxel; the result is cut to the organ (labels >= 1). Draws repeat (up to
    ``max_draws``) until at least ``min_kept`` of the donor's voxels stay inside; else the draw that kept the
    most is used (``kept_fraction`` in the record says how much). Returns ``(tumour bool, record)``.
    """
    src = np.argwhere(donor)
    if not len(src):
        raise ValueError(f"{donor_id or 'donor'}: the donor mask holds no tumour voxel")
    organ = _organ_voxels(mask)
    inside = mask >= 1
    best = None
    for draw in range(1, max_draws + 1):
        flips = rng.random(3) < 0.5
        pts = np.where(flips, -src, src)  # mirrored; where it lands is the shift's job
        anchor = pts[int(rng.integers(len(pts)))]
        target = organ[int(rng.integers(len(organ)))]
        shift = target - anchor
        moved = pts + shift
        ok = np.all((moved >= 0) & (moved < np.asarray(mask.shape)), axis=1)
        tumour = np.zeros(mask.shape, dtype=bool)
        tumour[tuple(moved[ok].T)] = True
        tumour &= inside
        kept = float(tumour.sum()) / len(src)
        if best is None or kept > best[1]:
            best = (tumour, kept, flips, shift, draw)
        if kept >= min_kept:
            break
    tumour, kept, flips, shift, draws = best
    record = {"kind": "real", "donor": donor_id, "flips": [bool(f) for f in flips], "shift": [int(s) for s in shift],
              "donor_voxels": int(len(src)), "voxels": int(tumour.sum()), "kept_fraction": round(kept, 4), "draws": draws}
    return tumour, record


# ------------------------------------------------------------------------------------------------ inpainting


def blend_weights(tumour: np.ndarray, margin: int) -> np.ndarray:
    """Paste-back weight of the generated CT, (D, H, W) float32 in [0, 1]: 1 in the tumour,
    ``1 - d / (margin + 1)`` at Euclidean distance ``0 < d <= margin`` voxels from it, 0 beyond (so the output
    equals the real CT voxel for voxel outside the tumour dilated by ``margin``)."""
    tumour = np.asarray(tumour, dtype=bool)
    if margin <= 0 or not tumour.any():
        return tumour.astype(np.float32)
    from scipy.ndimage import distance_transform_edt

    d = distance_transform_edt(~tumour)
    return np.where(d <= margin, 1.0 - d / (margin + 1), 0.0).astype(np.float32)


def latent_region(voxels: torch.Tensor, factors: Sequence[int], dilation: int = 1) -> torch.Tensor:
    """The generated region on the latent grid: ``voxels`` (B, 1, D, H, W) bool -> (B, 1, d, h, w) bool, a latent cell
    is in when any of its voxels is, then dilated by ``dilation`` cells (3x3x3 max-pool steps)."""
    f = tuple(int(v) for v in factors)
    cells = torch.nn.functional.max_pool3d(voxels.float(), kernel_size=f, stride=f)
    for _ in range(int(dilation)):
        cells = torch.nn.functional.max_pool3d(cells, kernel_size=3, stride=1, padding=1)
    return cells > 0


def repaint_schedule(n: int, jump: int = 1, resample: int = 1) -> list[int]:
    """The positions visited, as steps left to the clean latent (``n`` = pure noise, 0 = clean).

    RePaint's ``get_schedule_jump`` (Lugmayr et al. 2022) on the sampler's ``n`` steps: a decrease is one
    denoising step, an increase one forward-noising step. Every ``jump`` steps the last ``jump`` steps are
    undone and redone, ``resample - 1`` times. ``jump=1, resample=1``: ``[n, n - 1, ..., 0]``.
    """
    # RePaint's loop verbatim in its own index t (the next model call's timestep; -1 = clean), then p = t + 1
    jumps = {j: resample - 1 for j in range(0, n - jump, jump)}
    t, ts = n, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump):
                t += 1
                ts.append(t)
    ts.append(-1)
    return [t + 1 for t in ts]


def known_noise_seed(seed: int) -> int:
    """Seed of the generator that draws the real (known) latent's noise of sample ``seed``: one
    ``randn(latent_shape)`` per denoiser call, in call order (the sample's own generator draws the rest)."""
    return derive_seed(int(seed), "inpaint-known")


@torch.no_grad()
def inpaint_latents(pipe, known: torch.Tensor, region: torch.Tensor, masks: torch.Tensor, *, seeds: Sequence[int],
                    guidance: float = 1.0, sampler: str = "ddim", steps: int = 50, jump: int = 1, resample: int = 1,
                    callback: Callable[[int, int, torch.Tensor], None] | None = None,
                    show_progress: bool = False) -> torch.Tensor:
    """RePaint latent inpainting with a ``LadPipeline``.

    known: ``(B, C, d, h, w)`` the real CT's scaled latent (``pipe.encode``); region: ``(B, 1, d, h, w)`` bool, True
    where the latent is generated; masks: ``(B, 1, D, H, W)`` uint8 in {0, 1, 2}, the condition (organ + placed
    tumour). Before every denoiser call at timestep t the latent outside ``region`` is set to
    ``scheduler.add_noise(known, noise, t)`` (noise: ``known_noise_seed``'s generator); inside, the sampler's own
    chain with the mask's condition (classifier-free guidance, eq. 4). After the last step the outside is
    ``known`` itself. ``callback(call, t, z)`` sees the latent each denoiser call receives.
    Returns the scaled latent ``(B, C, d, h, w)``.
    """
    from lad.models.guidance import guided_epsilon

    if len(seeds) != known.shape[0] or masks.shape[0] != known.shape[0] or region.shape[0] != known.shape[0]:
        raise ValueError(f"need one seed, mask and region per latent: {len(seeds)} seeds, {masks.shape[0]} masks, "
                         f"{region.shape[0]} regions for {known.shape[0]} latents")
    if sampler not in INPAINT_SAMPLERS:
        raise ValueError(f"--sampler {sampler!r} cannot inpaint: the latent is replaced between steps, which needs a one-step "
                         f"sampler ({', '.join(INPAINT_SAMPLERS)}); the multistep solver's history would not match it")
    dev = pipe.device
    scheduler = pipe.make_scheduler(sampler)
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    n = len(ts)
    if resample > 1 and jump >= n:
        raise ValueError(f"--jump {jump} must be smaller than the {n} sampling steps for RePaint resampling")
    if resample > 1 and not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"--resample {resample}: RePaint's jump back noises with the DDPM schedule (alpha_bar); the "
                         f"{sampler} sampler of this run has none: use --resample 1")
    level = [1.0]  # alpha_bar at p steps left (p = 0: clean), for the jumps back
    if resample > 1:
        abar = scheduler.alphas_cumprod.double()
        level += [float(abar[ts[n - p]]) for p in range(1, n + 1)]
    gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    known_gens = [torch.Generator(device=dev).manual_seed(known_noise_seed(s)) for s in seeds]
    known, region = known.to(dev), region.to(dev)
    cond, spatial = pipe.conditions(masks), pipe.spatial(masks)
    null = pipe.condition.null_cond if pipe.condition is not None else None
    z = torch.stack([torch.randn(pipe.latent_shape, generator=g, device=dev) for g in gens])
    path = repaint_schedule(n, jump, resample)
    calls = 0
    bar = progress(total=len(path) - 1, desc="denoising", leave=False, disable=not show_progress)
    for p, q in zip(path[:-1], path[1:]):
        if q < p:  # one denoising step from p to p - 1 steps left, at timestep ts[n - p]
            t = ts[n - p]
            noise = torch.stack([torch.randn(pipe.latent_shape, generator=g, device=dev) for g in known_gens])
            z = torch.where(region, z, scheduler.add_noise(known, noise, t))
            if callback is not None:
                callback(calls, t, z)
            tt = torch.full((z.shape[0],), t, device=dev, dtype=torch.long)
            eps = guided_epsilon(pipe.denoiser, z, tt, cond, null, guidance_scale=guidance, spatial=spatial)
            z = scheduler.step(eps, scheduler.timesteps[n - p], z, generator=gens)
            calls += 1
        else:  # RePaint's jump back: z_q ~ q(z_q | z_p), one forward step to the noisier level
            ratio = level[q] / level[p]
            noise = torch.stack([torch.randn(pipe.latent_shape, generator=g, device=dev) for g in gens])
            z = math.sqrt(ratio) * z + math.sqrt(1.0 - ratio) * noise
        bar.update(1)
    bar.close()
    return torch.where(region, z, known)


def inpaint_volumes(pipe, hu: np.ndarray, masks: np.ndarray, tumours: np.ndarray, *, seeds: Sequence[int],
                    guidance: float = 1.0, sampler: str = "ddim", steps: int = 50, jump: int = 1, resample: int = 1,
                    blend_margin: int = 2, latent_dilation: int = 1, callback=None) -> tuple[np.ndarray, list[dict]]:
    """Tumours into real CT windows.

    hu: ``(B, D, H, W)`` HU of the real windows; masks: ``(B, D, H, W)`` uint8 Lad masks with the placed tumours
    (label 2), the condition; tumours: ``(B, D, H, W)`` bool, the placed tumours (where the output is generated).
    Returns ``(out (B, D, H, W) float32 HU, per-sample info)``: ``out`` equals ``hu`` wherever the blending weight
    (``blend_weights(tumour, blend_margin)``) is 0.
    """
    from lad.data.labels import hu_to_unit

    hu = np.asarray(hu, dtype=np.float32)
    weights = np.stack([blend_weights(t, blend_margin) for t in tumours])
    images = torch.as_tensor(hu_to_unit(hu))[:, None]
    known = pipe.encode(images)
    region = latent_region(torch.as_tensor(weights > 0)[:, None], pipe.latent_factors, latent_dilation)
    mask_t = torch.as_tensor(np.ascontiguousarray(masks, dtype=np.uint8))[:, None]
    z = inpaint_latents(pipe, known, region, mask_t, seeds=seeds, guidance=guidance, sampler=sampler, steps=steps,
                        jump=jump, resample=resample, callback=callback)
    generated = pipe.to_hu(pipe.decode(z))[:, 0]
    out = np.where(weights > 0, weights * generated + (1.0 - weights) * hu, hu).astype(np.float32)
    path = repaint_schedule(int(steps), jump, resample)
    calls = sum(1 for a, b in zip(path[:-1], path[1:]) if b < a)
    info = [{"latent_cells": int(region[k].sum()), "blended_voxels": int((weights[k] > 0).sum()), "denoiser_calls": calls}
            for k in range(len(hu))]
    return out, info


# ------------------------------------------------------------------------------------------------ sample folder


def _write(folder, j: int, hu: np.ndarray, label: np.ndarray, affine: np.ndarray, fmt: str) -> dict[str, str]:
    """The CT as int16 HU (rounded; unclipped, so the real voxels keep their values) and the label as uint8."""
    from lad.utils.atomic import atomic_path

    paths = folder.sample_paths(j, fmt)
    ct = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    if fmt == "npy":
        for key, arr in (("ct", ct), ("mask", label.astype(np.uint8))):
            with atomic_path(paths[key], suffix=".npy") as tmp:
                np.save(tmp, arr)
    else:
        from lad.data.io import write_nifti

        write_nifti(ct, affine, paths["ct"])
        write_nifti(label.astype(np.uint8), affine, paths["mask"])
    return {k: str(p.relative_to(folder.root)) for k, p in paths.items()}


def _cases(source: CTSource, settings: InpaintSettings) -> tuple[list[int], list[int]]:
    """(target windows, real-tumour donor windows) of the source, in source order."""
    targets, donors = [], []
    for i in range(len(source)):
        organ, tumour = source.flags(i)
        if not organ:
            raise ValueError(f"{source.where(i)}: no organ in the mask (label 1): a tumour has nowhere to go; remove "
                             "the case or give its organ mask")
        if tumour:
            donors.append(i)
        if settings.cases == "all" or not tumour:
            targets.append(i)
    if not targets:
        raise ValueError(f"{source.path}: every one of its {len(source)} windows already holds a tumour (label 2); "
                         "--inpaint-cases all places tumours into them too")
    if settings.tumour == "real" and not donors:
        raise ValueError(f"{source.path}: --tumour real needs windows with a tumour (label 2) to take masks from; "
                         "none found (use --tumour ellipsoid)")
    return targets, donors


def place_tumour(case: CTCase, settings: InpaintSettings, rng: np.random.Generator, source: CTSource,
          donors: Sequence[int]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(tumour (D, H, W) bool, label (D, H, W) uint8, record)`` for one window, drawn from ``rng``."""
    from lad.downstream.supervised.data import axis_spacing

    if settings.tumour == "ellipsoid":
        tumour, rec = ellipsoid_tumour(case.mask, axis_spacing(case.affine), rng, settings.tumour_sizes)
    else:
        pool = [d for d in donors if source.ids[d] != case.id] or list(donors)
        d = pool[int(rng.integers(len(pool)))]
        tumour, rec = real_tumour(case.mask, source.read_mask(d) == 2, rng, donor_id=source.where(d))
    label = case.mask.copy()
    label[tumour] = 2
    return tumour, label, rec


def generate_inpainted(run: str | Path, ct_dir: str | Path, out: str | Path, settings: InpaintSettings, *,
                       shard: str | None = None, batch_size: int = 1, device: str = "cpu", overwrite: bool = False,
                       stop_after: int | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Write ``settings.n`` CT windows of ``ct_dir`` with a synthetic tumour each into the sample folder ``out``
    (this process's shard; ``stop_after``, for tests, stops after that many new samples). ``run``: a run folder or
    an exported pipeline. ``progress_bar=False`` (``--no-progress``): no bar. Returns a summary."""
    from lad.sampling.generate import resolve_settings
    from lad.sampling.pipeline import LadPipeline
    from lad.sampling.writer import SampleFolder, parse_shard, shard_indices
    from lad.schedulers import check_sampler
    from lad.utils import distributed as ddist

    settings = dataclasses.replace(settings, tumour_sizes=tuple(settings.tumour_sizes))
    settings.validate()
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"--batch-size must be a whole number >= 1, got {batch_size}")
    shard_ik = parse_shard(shard)
    if not Path(ct_dir).exists():  # before the run is loaded: the most likely mistake first
        raise FileNotFoundError(f"{ct_dir}: --inpaint CT folder does not exist")
    settings = resolve_settings(settings, run)
    if settings.sampler not in INPAINT_SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(INPAINT_SAMPLERS)} with --inpaint (one-step samplers: the "
                         f"latent is replaced between steps), got {settings.sampler!r}")
    if not math.isfinite(settings.guidance):
        raise ValueError(f"--guidance must be a finite number, got {settings.guidance}")
    if int(settings.steps) != settings.steps or settings.steps < 1:
        raise ValueError(f"--steps must be a whole number >= 1, got {settings.steps}")
    if settings.resample > 1 and settings.jump >= settings.steps:
        raise ValueError(f"--jump {settings.jump} must be smaller than --steps {settings.steps} for RePaint resampling")
    pipe = LadPipeline.from_pretrained(run, device=str(ddist.local_device(device)))
    check_sampler(pipe.scheduler.config["prediction_type"], settings.sampler)  # euler for rectified flow, else ddpm/ddim
    if settings.resample > 1 and settings.sampler == "euler":
        raise ValueError("--resample > 1 needs a DDPM-trained run (RePaint's jump back noises with its alpha_bar); "
                         "this run samples with euler (rectified flow): use --resample 1")
    max_steps = int(pipe.scheduler.config["num_train_timesteps"])
    if settings.steps > max_steps:
        raise ValueError(f"--steps {settings.steps}: the model was trained with {max_steps} timesteps, so at most "
                         f"{max_steps} sampling steps can run")
    source = CTSource(ct_dir, shape=pipe.image_shape, split=settings.split)
    targets, donors = _cases(source, settings)
    folder = SampleFolder(out)
    saved = {**dataclasses.asdict(settings), "tumour_sizes": list(settings.tumour_sizes), "mode": "inpaint",
             "run": str(Path(run).resolve()), "masks": str(Path(ct_dir).resolve()), "checkpoint_hash": pipe.checkpoint_hash,
             "masks_fingerprint": source.fingerprint()}
    folder.check(saved, overwrite=overwrite)
    lock = folder.lock(shard_ik)
    try:
        folder.open(saved, overwrite=overwrite)
        todo = [j for j in shard_indices(settings.n, shard_ik) if not folder.is_done(j)]
        if stop_after is not None:
            todo = todo[:stop_after]
        t0, done = time.perf_counter(), 0
        bar = progress(total=len(todo), desc="inpainting", unit="vol", disable=not progress_bar)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            seeds = [derive_seed(settings.seed, j) for j in batch]
            cases = [source[targets[j % len(targets)]] for j in batch]
            placed = [place_tumour(c, settings, np.random.default_rng(derive_seed(s, "tumour")), source, donors)
                      for c, s in zip(cases, seeds)]
            out_hu, info = inpaint_volumes(
                pipe, np.stack([c.hu for c in cases]), np.stack([p[1] for p in placed]), np.stack([p[0] for p in placed]),
                seeds=seeds, guidance=settings.guidance, sampler=settings.sampler, steps=settings.steps,
                jump=settings.jump, resample=settings.resample, blend_margin=settings.blend_margin,
                latent_dilation=settings.latent_dilation)
            for k, j in enumerate(batch):
                files = _write(folder, j, out_hu[k], placed[k][1], cases[k].affine, settings.format)
                folder.write_record(j, {
                    "id": f"sample_{j:06d}", "index": j, "seed": seeds[k], "mode": "inpaint",
                    "source_mask": cases[k].source, "source_id": cases[k].id, "tumour": placed[k][2],
                    "inpaint": {"blend_margin": settings.blend_margin, "latent_dilation": settings.latent_dilation,
                                "jump": settings.jump, "resample": settings.resample, **info[k]},
                    "sampler": settings.sampler, "steps": settings.steps, "guidance": settings.guidance,
                    "checkpoint_hash": pipe.checkpoint_hash, "files": files,
                })
                done += 1
            bar.update(len(batch))
        bar.close()
        total = folder.rebuild_manifest()
    finally:
        folder.unlock(lock)
    secs = time.perf_counter() - t0
    log.info("inpainted %d tumours into real CT (%s-%d, w = %g) in %.1f s; %d/%d finished in %s", done,
             settings.sampler.upper(), settings.steps, settings.guidance, secs, total, settings.n, out)
    return {"written": done, "finished_total": total, "requested": settings.n, "cases": len(targets),
            "seconds": round(secs, 2), "seconds_per_volume": round(secs / max(done, 1), 3)}
