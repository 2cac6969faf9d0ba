"""Anatomy of the procedural abdominal CT phantom (``lad.data.phantom``): geometry helpers and painting.

Positions are in mm in a patient frame: ``u`` + towards the patient's left, ``v`` + towards posterior,
``t`` mm below the top slice (the liver dome level). Every organ is an analytic shape (ellipsoid,
elliptic cylinder, variable-radius tube) evaluated on coordinates that a smooth random displacement
field deforms, so shapes vary smoothly from subject to subject. Bowel is the intersection of the zero
sets of two smooth random fields (worm-like tubes that read as small-bowel loops on axial slices).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["HU", "Grid", "affine_for", "paint_anatomy"]

HU = {
    "air": -1000.0, "lung": -860.0, "fat": -100.0, "skin": 30.0, "muscle": 45.0, "visceral_fat": -95.0,
    "liver": 60.0, "liver_lesion": 25.0, "gallbladder": 8.0, "spleen": 50.0, "pancreas": 40.0, "tumor": 22.0,
    "kidney_cortex": 165.0, "kidney_medulla": 95.0, "renal_sinus": -60.0, "aorta": 170.0, "ivc": 120.0,
    "mesenteric_vessel": 150.0, "bone_cortical": 800.0, "bone_cancellous": 250.0, "disc": 80.0,
    "bowel_wall": 70.0, "fluid": 8.0, "stool": 10.0, "gas": -950.0,
}
"""Nominal HU per tissue (portal-venous-like contrast phase); each subject jitters some of them."""


class Grid:
    """Deformed patient-frame coordinates of every voxel: u (mm, + towards patient left),
    v (mm, + towards posterior), t (mm below the top slice)."""

    def __init__(self, shape, spacing, rng, amplitude, *, half_extent_mm=None):
        """``shape`` (D, H, W) of the full volume; only the centred in-plane window |u| <= half_extent_mm[0],
        |v| <= half_extent_mm[1] is computed (``self.shape``, ``self.window``): the air around the body
        needs no anatomy (about 30% less work on a 256 x 256 grid)."""
        import torch

        d, h, w = shape
        sx, sy, sz = spacing
        self.full_shape, self.spacing = tuple(shape), spacing
        eu, ev = half_extent_mm if half_extent_mm is not None else (np.inf, np.inf)
        hs = slice(max(0, int(np.floor((h - 1) / 2 - ev / sy))), min(h, int(np.ceil((h - 1) / 2 + ev / sy)) + 1))
        ws = slice(max(0, int(np.floor((w - 1) / 2 - eu / sx))), min(w, int(np.ceil((w - 1) / 2 + eu / sx)) + 1))
        self.window = (hs, ws)
        self.shape = (d, hs.stop - hs.start, ws.stop - ws.start)
        self._ch, self._cw = (h - 1) / 2 - hs.start, (w - 1) / 2 - ws.start  # centre in window indices
        self.margin = 3.0 * amplitude + 2.0 * max(spacing)
        t = (d - 1 - np.arange(d, dtype=np.float32)) * sz  # d=0 is inferior: t = distance below the top
        v = (np.arange(self.shape[1], dtype=np.float32) - self._ch) * sy
        u = (np.arange(self.shape[2], dtype=np.float32) - self._cw) * sx
        # smooth displacement: a coarse random field upsampled to the grid (torch's trilinear
        # interpolation: 20x faster here than scipy.ndimage.zoom on a 94x256x256 grid)
        coarse = torch.from_numpy(rng.normal(0, amplitude, size=(1, 3, 4, 5, 5)).astype(np.float32))
        disp = torch.nn.functional.interpolate(coarse, size=self.shape, mode="trilinear", align_corners=True)[0].numpy()
        self.t = t[:, None, None] + disp[0]
        self.v = v[None, :, None] + disp[1]
        self.u = u[None, None, :] + disp[2]

    def paste(self, sub: np.ndarray, fill) -> np.ndarray:
        """The full (D, H, W) volume holding ``sub`` (window-shaped) in the window and ``fill`` elsewhere."""
        out = np.full(self.full_shape, fill, dtype=sub.dtype)
        out[:, self.window[0], self.window[1]] = sub
        return out

    def box(self, lo, hi) -> tuple[slice, slice, slice]:
        """Index slices (d, h, w) covering the patient-frame box [lo, hi] (u, v, t) plus the deformation margin."""
        d, h, w = self.shape
        sx, sy, sz = self.spacing
        m = self.margin
        w0, w1 = (lo[0] - m) / sx + self._cw, (hi[0] + m) / sx + self._cw
        h0, h1 = (lo[1] - m) / sy + self._ch, (hi[1] + m) / sy + self._ch
        d0, d1 = d - 1 - (hi[2] + m) / sz, d - 1 - (lo[2] - m) / sz
        clip = lambda a, b, n: slice(int(max(0, np.floor(a))), int(min(n, np.ceil(b) + 1)))
        return clip(d0, d1, d), clip(h0, h1, h), clip(w0, w1, w)

    def ellipsoid(self, c, axes, *, shear: float = 0.0) -> np.ndarray:
        """Normalised radius r (< 1 inside) of an ellipsoid centre (u, v, t), semi-axes mm; ``shear`` moves
        the centre by ``shear`` mm in u per mm of t below the centre."""
        out = np.full(self.shape, 9.0, dtype=np.float32)
        reach = abs(shear) * axes[2]
        sl = self.box([c[0] - axes[0] - reach, c[1] - axes[1], c[2] - axes[2]], [c[0] + axes[0] + reach, c[1] + axes[1], c[2] + axes[2]])
        t = self.t[sl] - c[2]
        out[sl] = np.sqrt(((self.u[sl] - c[0] - shear * t) / axes[0]) ** 2 + ((self.v[sl] - c[1]) / axes[1]) ** 2 + (t / axes[2]) ** 2)
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


    def fields(self, rng: np.random.Generator, lengths_mm: list[float], *, step_mm: float = 4.0) -> np.ndarray:
        """Smooth zero-mean unit-variance random fields, one per correlation length: (C, D, H, W) float32.

        Drawn on a coarse ``step_mm`` grid, Gaussian-smoothed there and upsampled trilinearly (one
        torch call for all channels: about 10x cheaper than filtering at full resolution).
        """
        import torch

        d, h, w = self.shape
        sx, sy, sz = self.spacing
        cshape = tuple(max(3, int(np.ceil(n * s / step_mm)) + 1) for n, s in ((d, sz), (h, sy), (w, sx)))
        chans = []
        for length in lengths_mm:
            f = ndimage.gaussian_filter(rng.normal(size=cshape).astype(np.float32), sigma=length / step_mm / 2.0, mode="wrap")
            chans.append((f - f.mean()) / max(float(f.std()), 1e-6))
        x = torch.from_numpy(np.stack(chans)[None])
        return torch.nn.functional.interpolate(x, size=self.shape, mode="trilinear", align_corners=True)[0].numpy()


def affine_for(shape, spacing) -> np.ndarray:
    """(4, 4) float64 (d, h, w) -> RAS mm for the canonical orientation, centred in-plane, z from -extent/2."""
    d, h, w = shape
    sx, sy, sz = spacing
    a = np.zeros((4, 4))
    a[0, 2], a[1, 1], a[2, 0], a[3, 3] = -sx, -sy, sz, 1.0  # w -> patient left (RAS -x), h -> posterior (-y), d -> S
    a[:3, 3] = [(w - 1) / 2 * sx, (h - 1) / 2 * sy, -(d - 1) / 2 * sz]
    return a


def paint_anatomy(shape, spacing, rng: np.random.Generator, *, tumor: bool, lesions: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """Paint one subject on a (D, H, W) grid of ``spacing`` (x, y, z) mm.

    Returns (hu float32 (D, H, W) noise-free, labels uint8 (D, H, W) in {0..5}, has_tumor).
    """
    # body habitus: skin, subcutaneous fat, muscle wall (thicker anteriorly: recti), visceral cavity
    a, b = rng.uniform(135, 170), rng.uniform(100, 130)
    fat, wall = rng.uniform(10, 35), rng.uniform(8, 13)
    v0 = rng.uniform(-8, 8)
    amplitude = rng.uniform(3.0, 7.0)
    reach = 3.0 * amplitude + 2.0 * max(spacing) + 2.0
    g = Grid(shape, spacing, rng, amplitude, half_extent_mm=(a + reach, b + abs(v0) + reach))
    shape, sx = g.shape, spacing[0]
    hu = np.full(shape, HU["air"], dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    r_body = g.cylinder((0, v0), (a, b))
    hu[r_body < 1] = HU["skin"]
    hu[r_body < 1 - 2.5 / b] = HU["fat"]
    hu[g.cylinder((0, v0), (a - fat, b - fat)) < 1] = HU["muscle"]
    cavity = g.cylinder((0, v0 - 3), (a - fat - wall, b - fat - wall - 2)) < 1
    linea_alba = (np.abs(g.u) < 4) & (g.v < v0)
    hu[cavity | (linea_alba & (g.cylinder((0, v0), (a - fat, b - fat)) < 1))] = HU["visceral_fat"]

    # spine: vertebral body with discs every ~32 mm, posterior elements, canal, paraspinal muscles
    sv = v0 + b - fat - rng.uniform(55, 65)
    para = (g.cylinder((-30, sv + 38), (22, 20)) < 1) | (g.cylinder((30, sv + 38), (22, 20)) < 1)
    hu[para] = HU["muscle"]
    vb = g.cylinder((0, sv), (22, 18))
    disc = np.mod(g.t + rng.uniform(0, 32), 32.0) < 7.0
    hu[vb < 1] = HU["bone_cortical"]
    hu[vb < 0.82] = HU["bone_cancellous"]
    hu[(vb < 1) & disc] = HU["disc"]
    canal = g.cylinder((0, sv + 26), (9, 8)) < 1
    post = (g.cylinder((0, sv + 42), (6, 16)) < 1) | (g.cylinder((-14, sv + 28), (6, 7)) < 1) | (g.cylinder((14, sv + 28), (6, 7)) < 1)
    hu[post & ~disc] = HU["bone_cortical"] * 0.8
    hu[canal] = 20.0
    spine = (vb < 1.1) | post | canal | para

    # ribs: arcs in the muscle wall, in bands along z over the upper abdomen
    ang = np.arctan2(g.v - v0, g.u)
    ring = g.cylinder((0, v0), (a - fat - wall * 0.5, b - fat - wall * 0.5))
    rib_band = (np.mod(g.t + rng.uniform(0, 24), 24.0) < 10.0) & (g.t < rng.uniform(110, 140))
    dash = np.mod(ang + g.t / 60.0, 0.55) < 0.16
    hu[(np.abs(ring - 1) < 0.03) & rib_band & dash & ((ang > -0.2) | (ang < -2.9))] = HU["bone_cortical"] * 0.75

    # vessels anterior to the spine
    av, ivc_u = sv - 32, -rng.uniform(22, 30)
    aorta = g.cylinder((rng.uniform(4, 14), av), (10.5, 10.5)) < 1
    ivc = g.cylinder((ivc_u, av + 2), (13, 9)) < 1

    # organs: deformed, randomly scaled ellipsoids and tubes
    s = rng.uniform(0.88, 1.12, size=8)
    liver_c = (-a * 0.38, v0 - 3 + rng.uniform(-8, 8), rng.uniform(92, 104))
    liver = g.ellipsoid(liver_c, (78 * s[0], 85 * s[0], 78 * s[1]), shear=-0.55) < 1  # narrows to the right caudally
    left_lobe = g.ellipsoid((liver_c[0] + 75, v0 - b * 0.5, liver_c[2] - 35), (60 * s[0], 26 * s[0], 34 * s[1]), shear=-0.5) < 1
    liver = (liver | left_lobe) & cavity & ~(g.cylinder((-8, sv - 8), (34, 40)) < 1) & ~ivc
    gb = (g.ellipsoid((liver_c[0] + 15, v0 - b * 0.5, liver_c[2] + 40), tuple(np.array([13.0, 16.0, 28.0]) * s[6])) < 1) & cavity
    liver &= ~gb
    spleen_c = (a * 0.62, sv - 5 + rng.uniform(-6, 6), rng.uniform(70, 88))
    spleen = (g.ellipsoid(spleen_c, (24 * s[2], 42 * s[2], 50 * s[3])) < 1) & cavity
    kid_t = rng.uniform(122, 135)
    kid_r, sinus = [], np.zeros(shape, bool)
    for side, dt in ((-1, 8.0), (1, -8.0)):
        kc = (side * rng.uniform(60, 72), sv + rng.uniform(5, 15), kid_t + dt)
        kid_r.append(g.ellipsoid(kc, (26 * s[4], 28 * s[4], 52 * s[5])))
        sinus |= g.ellipsoid((kc[0] - side * 13, kc[1] - 5, kc[2]), (11, 8, 20)) < 1  # sinus fat, antero-medial
    kidney = ((kid_r[0] < 1) | (kid_r[1] < 1)) & ~sinus
    cortex = kidney & (((kid_r[0] < 1) & (kid_r[0] > 0.74)) | ((kid_r[1] < 1) & (kid_r[1] > 0.74)))
    perirenal = (kid_r[0] < 1.3) | (kid_r[1] < 1.3)

    # pancreas: head (right, by the duodenum) -> body (anterior to the aorta) -> tail (splenic hilum)
    pt = rng.uniform(95, 115)
    pts = np.array([
        [ivc_u - 5, av - 14, pt + 16],
        [ivc_u + 5, av - 26, pt + 6],
        [8, av - 30 + rng.uniform(-4, 4), pt],
        [a * 0.32, av - 22, pt - 5],
        [spleen_c[0] - 28, spleen_c[1] - 12, pt - 10],
    ], dtype=np.float32)
    radii = np.array([16, 12, 9, 8, 7], dtype=np.float32) * rng.uniform(0.85, 1.15)
    pancreas = g.tube(pts, radii) < 1
    kidney_any = (kid_r[0] < 1) | (kid_r[1] < 1)
    liver &= ~kidney_any  # a voxel's label always matches the tissue painted there
    spleen &= ~kidney_any
    pancreas &= ~(aorta | ivc | kidney_any | spleen)
    duodenum = g.tube(np.array([[ivc_u - 10, av - 40, pt - 10], [ivc_u - 32, av - 22, pt + 16], [ivc_u - 20, av - 8, pt + 45]],
                               dtype=np.float32), np.array([11, 12, 11], dtype=np.float32))

    # psoas muscles: appear beside the spine below the kidneys' upper poles and thicken caudally
    psoas = np.zeros(shape, bool)
    for side in (-1, 1):
        p = np.array([[side * 22, sv - 2, kid_t - 40], [side * 38, sv - 4, kid_t + 30], [side * 48, sv - 8, kid_t + 140]], dtype=np.float32)
        psoas |= g.tube(p, np.array([3, 14, 22], dtype=np.float32)) < 1
    psoas &= cavity & ~spine

    # hollow viscera: stomach (air-fluid level), colon frame (mottled stool and gas), small-bowel loops
    st_c = (a * 0.3, v0 - b * 0.3, rng.uniform(60, 80))
    st_r = g.ellipsoid(st_c, (45 * s[7], 35 * s[7], 45))
    colon_pts = np.array([
        [-a * 0.58, v0 - b * 0.05, kid_t + 110], [-a * 0.6, v0 + b * 0.05, kid_t + 10], [-a * 0.45, v0 - b * 0.45, kid_t - 25],
        [0, v0 - b * 0.72, kid_t - 5 + rng.uniform(-15, 15)], [a * 0.5, v0 - b * 0.35, kid_t - 50],
        [a * 0.68, sv - 5, kid_t], [a * 0.6, sv - 15, kid_t + 110]], dtype=np.float32)
    colon_r = g.tube(colon_pts, np.array([26, 24, 22, 20, 18, 16, 15], dtype=np.float32) * rng.uniform(0.85, 1.1))
    f = g.fields(rng, [32.0, 32.0, 50.0, 8.0, 14.0, 14.0])
    rb = np.hypot(f[0], f[1]) / rng.uniform(0.8, 0.95)
    fine_vessels = np.hypot(f[4], f[5]) < 0.1
    solid = liver | gb | spleen | kidney | sinus | pancreas | aorta | ivc | spine | psoas
    free = cavity & ~solid
    lung = free & (g.t < rng.uniform(10, 25) + 0.3 * (g.v - v0 + b)) & (st_r > 1) & (np.abs(g.u) > 35)  # costophrenic recesses
    hu[lung] = HU["lung"]
    hu[lung & fine_vessels] = -400.0  # pulmonary vessels
    free &= ~lung
    bowel_zone = free & (g.v < sv - 14) & ~perirenal & (g.t > rng.uniform(45, 70))
    hu[(rb < 1) & bowel_zone] = HU["bowel_wall"]
    lumen = (rb < 0.72) & bowel_zone
    hu[lumen] = HU["fluid"] + 8.0 * f[3][lumen]
    hu[lumen & (f[2] > 1.0)] = HU["gas"]
    vessels = bowel_zone & (rb > 1.15) & fine_vessels
    hu[vessels] = HU["mesenteric_vessel"]
    colon = (colon_r < 1) & free
    hu[colon] = HU["bowel_wall"]
    stool = (colon_r < 0.82) & free
    hu[stool] = HU["stool"] + 25.0 * f[3][stool]
    hu[stool & ((f[3] > 0.9) | (f[2] < -1.3))] = HU["gas"]  # stool is mottled with gas
    duo = (duodenum < 1) & free
    hu[duo] = HU["bowel_wall"]
    hu[(duodenum < 0.7) & free] = HU["fluid"]
    stomach = (st_r < 1) & free
    hu[stomach] = HU["bowel_wall"]
    hu[(st_r < 0.86) & free] = HU["fluid"]
    hu[(st_r < 0.86) & free & (g.v < st_c[1] - rng.uniform(5, 15))] = HU["gas"]

    # solid organs and vessels win over everything painted before them
    hu[psoas] = HU["muscle"]
    hu[sinus & ((kid_r[0] < 1) | (kid_r[1] < 1))] = HU["renal_sinus"]
    hu[liver] = HU["liver"] + rng.uniform(-4, 4)
    hu[liver & fine_vessels] = HU["mesenteric_vessel"]  # portal / hepatic veins
    hu[gb] = HU["gallbladder"]
    hu[spleen] = HU["spleen"] + rng.uniform(-4, 4)
    hu[kidney] = HU["kidney_medulla"]
    hu[cortex] = HU["kidney_cortex"] + rng.uniform(-10, 20)
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
            hu[(g.ellipsoid(lc, (rng.uniform(5, 12),) * 3) < 1) & liver] = HU["liver_lesion"]
    if tumor:
        k = rng.uniform(0.1, 0.9) * (len(pts) - 1)
        i0 = int(k)
        tc = pts[i0] + (k - i0) * (pts[i0 + 1] - pts[i0])
        tr = rng.uniform(7, 14)
        bb = ndimage.find_objects(pancreas.astype(np.uint8))[0]
        bb = tuple(slice(max(0, q.start - 4), q.stop + 4) for q in bb)
        grown = np.zeros(shape, bool)
        grown[bb] = ndimage.binary_dilation(pancreas[bb], iterations=max(1, int(round(3.0 / sx))))
        tum = (g.ellipsoid(tc, (tr, tr * rng.uniform(0.8, 1.2), tr)) < 1) & grown
        if not tum.any():  # tiny grids: keep at least the nearest pancreas voxels
            tum = (g.ellipsoid(tc, (tr * 2,) * 3) < 1) & pancreas
        hu[tum] = HU["tumor"] + rng.uniform(-6, 6)
        lab[tum] = 5
        tumor = bool(tum.any())
    return g.paste(hu, HU["air"]), g.paste(lab, 0), bool(tumor)
