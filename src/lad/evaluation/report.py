"""Figures (MDS embedding with ellipses, slices with zoomed organ, HU histograms) and report.html."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from lad.utils.atomic import write_text

__all__ = ["write_report", "classical_mds", "fit_ellipse", "ELLIPSES"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def classical_mds(x: np.ndarray, dims: int = 2) -> np.ndarray:
    """Classical (Torgerson) MDS of points ``x`` (N, F) into ``dims`` dimensions."""
    d2 = np.clip((x * x).sum(1)[:, None] - 2 * x @ x.T + (x * x).sum(1)[None], 0, None)
    n = len(x)
    j = np.eye(n) - 1.0 / n
    b = -0.5 * j @ d2 @ j
    w, v = np.linalg.eigh(b)
    order = np.argsort(w)[::-1][:dims]
    return v[:, order] * np.sqrt(np.clip(w[order], 0, None))


ELLIPSES = ("least-squares", "2-sigma")


def fit_ellipse(points: np.ndarray, kind: str = "least-squares") -> tuple[np.ndarray, tuple[float, float], float] | None:
    """``(centre (2,), (semi-axis a, semi-axis b), angle of axis a in radians)`` of an ellipse for points (N, 2).

    "least-squares": the direct least-squares fit of an ellipse to the points (Halir & Flusser, scikit-image's
    ``EllipseModel``), as the paper's Figure 4 ("we fit an ellipse to the embedding with the least squares");
    None when it fails (fewer than 5 points, degenerate). "2-sigma": the covariance ellipse at 2 standard
    deviations (ours; None below 3 points).
    """
    pts = np.asarray(points, dtype=np.float64)
    if kind == "2-sigma":
        if len(pts) < 3:
            return None
        w, v = np.linalg.eigh(np.cov(pts.T))
        return pts.mean(0), (2 * np.sqrt(max(w[-1], 0)), 2 * np.sqrt(max(w[0], 0))), float(np.arctan2(v[1, -1], v[0, -1]))
    if kind != "least-squares":
        raise ValueError(f"ellipses must be one of {ELLIPSES}, got {kind!r}")
    if len(pts) < 5:
        return None
    from skimage.measure import EllipseModel

    if hasattr(EllipseModel, "from_estimate"):  # scikit-image >= 0.26
        m = EllipseModel.from_estimate(pts)
        if not m:
            return None
        centre, axes, theta = m.center, m.axis_lengths, m.theta
    else:
        m = EllipseModel()
        if not m.estimate(pts):
            return None
        xc, yc, a, b, theta = m.params
        centre, axes = (xc, yc), (a, b)
    if not np.all(np.isfinite([*centre, *axes, theta])):
        return None
    return np.asarray(centre, dtype=np.float64), (float(axes[0]), float(axes[1])), float(theta)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _mds_figure(embeds: dict[str, np.ndarray], ellipses: str = "least-squares") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    names = list(embeds)
    allf = np.concatenate([embeds[n] for n in names]).astype(np.float64)
    allf = (allf - allf.mean(0)) / (allf.std(0) + 1e-8)
    y = classical_mds(allf)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    s = 0
    for i, n in enumerate(names):
        pts = y[s : s + len(embeds[n])]
        s += len(embeds[n])
        c = _COLORS[i % len(_COLORS)]
        ax.scatter(pts[:, 0], pts[:, 1], s=14, color=c, label=f"{n} (N={len(pts)})", alpha=0.75)
        fit = fit_ellipse(pts, ellipses)
        if fit is not None:
            centre, (a, b), theta = fit
            ax.add_patch(Ellipse(centre, 2 * a, 2 * b, angle=np.degrees(theta), fill=False, color=c, lw=1.5))
    ax.set_title(f"MDS of 3D features ({ellipses} ellipses)")
    ax.legend(fontsize=8)
    return _png(fig)


SOFT_TISSUE_WINDOW = (-160, 240)  # HU display window of every CT panel in the reports


def ct_panel(ax, hu: np.ndarray, mask: np.ndarray | None = None) -> None:
    """One 2D CT slice (HU) in the soft-tissue window, with the organ contour where ``mask > 0``; no ticks."""
    ax.imshow(hu, cmap="gray", vmin=SOFT_TISSUE_WINDOW[0], vmax=SOFT_TISSUE_WINDOW[1])
    if mask is not None and (mask > 0).any():
        ax.contour(mask > 0, levels=[0.5], colors="#00e5ff", linewidths=0.6)
    ax.set_xticks([])
    ax.set_yticks([])


def _slices_figure(sets: dict[str, tuple[list, list]], box, n: int = 3) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lad.data.labels import unit_to_hu

    rows = [(name, v, m) for name, (vols, masks) in sets.items() for v, m in list(zip(vols, masks))[:n]]
    depth = rows[0][1].shape[1]
    zs = sorted({min(depth - 1, round(depth * f)) for f in (0.25, 0.5, 0.75)})
    fig, axes = plt.subplots(len(rows), len(zs) + 1, figsize=(2.4 * (len(zs) + 1), 2.4 * len(rows)), squeeze=False)
    for r, (name, v, m) in enumerate(rows):
        hu = unit_to_hu(v[0])
        for c, z in enumerate(zs):
            ax = axes[r][c]
            ct_panel(ax, hu[z], m[z])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(f"slice {z}", fontsize=8)
        zc = (box[0].start + box[0].stop) // 2
        ax = axes[r][-1]
        ct_panel(ax, hu[zc, box[1], box[2]])
        if r == 0:
            ax.set_title("organ region (zoom)", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def closest_pairs_figure(pairs: list[tuple[str, np.ndarray, np.ndarray, float]]) -> str:
    """Memorisation check by eye: each synthetic volume next to its nearest training volume (middle slice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lad.data.labels import unit_to_hu

    fig, axes = plt.subplots(len(pairs), 2, figsize=(5, 2.5 * len(pairs)), squeeze=False)
    for r, (name, syn, train, dist) in enumerate(pairs):
        z = syn.shape[1] // 2
        for c, (v, title) in enumerate(((syn, f"{name}: synthetic"), (train, f"nearest training (d={dist:.3g})"))):
            ct_panel(axes[r][c], unit_to_hu(v[0])[z])
            axes[r][c].set_title(title, fontsize=8)
            axes[r][c].axis("off")
    fig.tight_layout()
    return _png(fig)


def _hist_figure(results: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.asarray(results["settings"]["hu_bins"])
    centres = (bins[:-1] + bins[1:]) / 2
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(centres, results["real"]["hu_hist"]["organ"], color="black", lw=2, label="real")
    for i, (name, e) in enumerate(results["sets"].items()):
        ax.plot(centres, e["hu_hist"]["organ"], color=_COLORS[(i + 1) % len(_COLORS)], label=name)
    ax.set_xlabel("HU inside the conditioned organ")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title("Intensity realism: organ HU histogram")
    return _png(fig)


def _ci(value: float, ci: Any, fmt: str = ".4g") -> str:
    """``value [low, high]`` (the bootstrap 95 % interval stored as the ``*_ci95`` sibling), or the value alone."""
    if not ci or len(ci) != 2 or not all(np.isfinite(ci)):
        return f"{value:{fmt}}"
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _selection_text(sel: dict[str, Any] | None) -> str:
    """The median-HU selection of a sample set, as the report shows it (``lad.sampling.generate.selection_summary``)."""
    if not sel or not sel.get("quality_check"):
        return "none"
    return f"median HU, {sel['rejection_rate']:.0%} of {sel['draws']} draws rejected"


def _table(results: dict[str, Any]) -> str:
    cols = [("FID", "fid"), ("MMD", "mmd"), ("FID loc.", "fid_localized"), ("MMD loc.", "mmd_localized"),
            ("MS-SSIM", "ms_ssim")]
    head = "".join(f"<th>{c}</th>" for c, _ in cols)
    extra_head = ("<th>precision</th><th>recall</th><th>coverage</th><th>memorised</th><th>fidelity Dice</th>"
                  "<th>selection</th><th>N</th>")
    rows = []
    for name, e in results["sets"].items():
        cells = "".join(f"<td>{_ci(e[k], e.get(k + '_ci95'))}</td>" for _, k in cols)
        fd, fd_ci = e.get("fidelity_dice"), e.get("fidelity_dice_ci95", {})
        fd_txt = ", ".join(f"{k} {_ci(v, fd_ci.get(k), '.3f')}" for k, v in fd.items()) if fd else "n/a (no --segmenter)"
        pci = e.get("prdc_ci95", {})
        cells += ("".join(f"<td>{_ci(e['prdc'][q], pci.get(q), '.3f')}</td>" for q in ("precision", "recall", "coverage"))
                  + f"<td>{e['memorisation']['n_flagged']}/{e['n']}</td><td>{html.escape(fd_txt)}</td>"
                  f"<td>{html.escape(_selection_text(e.get('selection')))}</td><td>{e['n']}</td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    real = results["real"]
    fd, fd_ci = real.get("fidelity_dice"), real.get("fidelity_dice_ci95", {})
    fd_txt = html.escape(", ".join(f"{k} {_ci(v, fd_ci.get(k), '.3f')}" for k, v in fd.items()) + " (ceiling)") if fd else ""
    rows.append(f"<tr><th>real (held-out)</th><td colspan=4></td><td>{_ci(real['ms_ssim'], real.get('ms_ssim_ci95'))}</td>"
                f"<td colspan=4></td><td>{fd_txt}</td><td></td><td>{real['n']}</td></tr>")
    return f"<table><tr><th></th>{head}{extra_head}</tr>{''.join(rows)}</table>"


def _fmt(v, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _anatomy_table(results: dict[str, Any]) -> str:
    """Set | present fraction per structure | body ok | bone ok | W1 organ | W1 body | fidelity Dice, with the
    held-out real windows as the last row (the ceiling: the reference is built from them)."""
    from lad.evaluation.anatomy import CORE_STRUCTURES, STRUCTURES

    mean_key = "mean_" + "_".join(CORE_STRUCTURES)
    real = results["real"]
    has_anat = "anatomy" in real
    head = ("".join(f"<th>{s}</th>" for s in STRUCTURES) + f"<th>mean ({', '.join(CORE_STRUCTURES)})</th>") if has_anat else ""
    head += "<th>body ok</th><th>bone ok</th><th>W1 organ (HU)</th><th>W1 body (HU)</th><th>fidelity Dice (organ)</th><th>N</th>"

    def row(name: str, e: dict[str, Any], w1: tuple[str, str]) -> str:
        cells = ""
        if has_anat:
            a = e.get("anatomy")
            cells += ("".join(f"<td>{_fmt(a['present_fraction'][s])}</td>" for s in STRUCTURES) if a
                      else f"<td colspan={len(STRUCTURES)}></td>")
            cells += f"<td><b>{_ci(a[mean_key], a.get(mean_key + '_ci95'), '.2f')}</b></td>" if a else "<td></td>"
        fd = (e.get("fidelity_dice") or {}).get("organ")
        fd_ci = (e.get("fidelity_dice_ci95") or {}).get("organ")
        frac = lambda k: _ci(e[k], e.get(k + "_ci95"), ".2f") if e.get(k) is not None else _fmt(None)
        cells += (f"<td>{frac('body_ok_fraction')}</td><td>{frac('bone_ok_fraction')}</td><td>{w1[0]}</td><td>{w1[1]}</td>"
                  f"<td>{_ci(fd, fd_ci, '.3f') if fd is not None else 'n/a (no --segmenter)'}</td><td>{e['n']}</td>")
        return f"<tr><th>{html.escape(name)}</th>{cells}</tr>"

    rows = [row(name, e, (_fmt(e["hu_w1"]["organ"], ".1f"), _fmt(e["hu_w1"]["body"], ".1f")))
            for name, e in results["sets"].items() if "body_ok_fraction" in e]
    if not rows:
        return ""
    seen = set()
    for name, e in results["sets"].items():  # one row per run: sets drawn from one run share its VQ-GAN
        c = e.get("decoder_ceiling")
        if c is None or c["run"] in seen:
            continue
        seen.add(c["run"])
        rows.append(row(f"{name}: its VQ-GAN's reconstructions of the real windows (decoder ceiling)", c,
                        (_fmt(c["hu_w1"]["organ"], ".1f"), _fmt(c["hu_w1"]["body"], ".1f"))))
    label = "real (held-out, ceiling)" if real.get("split", "test") == "test" else "real (training windows, ceiling)"
    rows.append(row(label, real, ("0 (reference)", "0 (reference)")))
    a = results["settings"].get("anatomy", {})
    lo, hi = a.get("body_fraction_range", (float("nan"), float("nan")))
    note = (f"<p>Present: the segmenter's voxel count of the structure lies inside the range of its counts on the real windows "
            f"(5th percentile rounded down, 95th rounded up, at least 1 voxel). Body ok: the largest component above "
            f"{a.get('body_hu', -500):g} HU covers {lo:.3f}-{hi:.3f} of the window (the real windows' minimum-maximum). Bone ok: a "
            f"component above {a.get('bone_hu', 200):g} HU of at least {a.get('bone_min_voxels')} voxels lies at least half inside "
            f"the real windows' spine region ({a.get('spine_region_voxels')} voxels). W1: Wasserstein-1 distance between the "
            f"synthetic and real HU values inside the conditioning organ and inside the body. The real row scores the real "
            f"windows against the reference built from themselves. Brackets: 95 % intervals (Wilson score intervals of the "
            f"fractions; bootstrap over volumes for the mean and the Dice). A decoder-ceiling row scores a model's VQ-GAN "
            f"reconstructions of the real windows: its samples are decoded by that VQ-GAN, so the gap from the real row to "
            f"it is the autoencoder's, the gap from it to the samples the diffusion model's.</p>")
    return f"<h2>Anatomy and realism checks</h2><table><tr><th></th>{head}</tr>{''.join(rows)}</table>{note}"


def _floor_table(results: dict[str, Any]) -> str:
    """FID / MMD of two halves of the real windows (the floor a perfect generator would reach at this N) beside
    each synthetic set against the same second half with as many volumes as the first half."""
    floor = results["real"].get("floor")
    if not floor:
        return ""
    keys = ("fid", "mmd", "fid_localized", "mmd_localized")
    head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys) + "<th>N vs N</th>"

    def row(name: str, e: dict[str, Any], n: str) -> str:
        return f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{_fmt(e[k], '.4g')}</td>" for k in keys) + f"<td>{n}</td></tr>"

    rows = [row("real vs real (floor)", floor, f"{floor['n_a']} vs {floor['n_b']}")]
    rows += [row(name, e["vs_half"], f"{e['vs_half']['n']} vs {e['vs_half']['n_real']}")
             for name, e in results["sets"].items() if e.get("vs_half")]
    return ("<h2>Real-vs-real floor</h2><p>The held-out windows split in two seeded halves: FID and MMD between the halves are "
            "what a generator indistinguishable from real data would score at this N (FID is biased upward at small N); each "
            "set is scored against the same second half with as many volumes as the first half.</p>"
            f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>")


def _reconstruction_table(results: dict[str, Any]) -> str:
    """The VQ-GAN reconstruction report of each set's run folder, when it has one."""
    from lad.evaluation.reconstruction import RECON_ORGANS

    recs = {name: e["vqgan_reconstruction"] for name, e in results["sets"].items() if e.get("vqgan_reconstruction")}
    if not recs:
        return ""
    head = ("<th>MAE body (HU)</th><th>bias body (HU)</th>" + "".join(f"<th>{o} mean-HU error</th>" for o in RECON_ORGANS)
            + "<th>codes used</th><th>perplexity</th><th>windows</th>")
    rows = []
    for name, r in recs.items():
        cells = f"<td>{_fmt(r.get('mae_body_hu'), '.1f')}</td><td>{_fmt(r.get('bias_body_hu'), '+.1f')}</td>"
        cells += "".join(f"<td>{_fmt(r.get('organ_mean_hu_error', {}).get(o), '+.1f')}</td>" for o in RECON_ORGANS)
        cells += (f"<td>{r['codes_used']}/{r['num_embeddings']}</td><td>{r['perplexity']:.1f}</td>"
                  f"<td>{r['n_windows']} ({html.escape(str(r.get('split')))})</td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return ("<h2>VQ-GAN reconstruction (held-out windows)</h2>"
            f"<table><tr><th>run of</th>{head}</tr>{''.join(rows)}</table>"
            "<p>Written by <code>lad train vqgan</code> into <code>RUN/vqgan_reconstruction.json</code>: the body is the voxels "
            "above -500 HU in the real window; bias and organ errors are reconstruction minus real (positive: too bright). "
            "Samples are decoded by this VQ-GAN, so they cannot look better than its reconstructions.</p>")


def write_report(out: Path, results: dict[str, Any], embeds: dict[str, np.ndarray], sets: dict, real: tuple, box,
                 title: str = "lad evaluation", preface: str = "", extra_figures: dict[str, str] | None = None,
                 ellipses: str = "least-squares") -> Path:
    """Write ``out/report.html`` (self-contained: images embedded); ``ellipses``: the MDS figure's (``fit_ellipse``)."""
    s = results["settings"]
    warn = "" if s["pretrained_features"] else (
        "<p class=warn><b>Untrained features</b>: a <b>random-initialised</b> 3D ResNet (no MedicalNet weights, no "
        "<code>lad features train</code> folder given): FID/MMD/PRDC values are comparable only with numbers from the "
        "same extractor, not with the paper's.</p>")
    if s.get("features_kind") == "in-domain":
        warn = ("<p>In-domain features: a 3D network trained by <code>lad features train</code> to segment the organs of "
                "the prepared training windows (never the held-out ones); comparable only with numbers from the same "
                "feature folder.</p>")
    boot = s.get("bootstrap")
    if boot and boot.get("replicates"):
        warn += (f"<p>Brackets: 95 % bootstrap intervals over volumes ({boot['replicates']} replicates, seed {boot['seed']}, "
                 "bias-corrected percentile); they show the sampling spread at this N, not the spread over training runs.</p>")
    if not s.get("selection_identical", True):
        warn += ("<p class=warn>The synthetic sets were sampled with <b>different median-HU selection</b> settings (column "
                 "'selection'): their metrics are not comparable.</p>")
    figs = {f"MDS embedding (Figure 4 style, {ellipses} ellipses)": _mds_figure(embeds, ellipses),
            "Slices 25/50/75% and the organ region (Figure 5 style)": _slices_figure({**sets, "real": (real[0], real[1])}, box),
            "Intensity realism": _hist_figure(results), **(extra_figures or {})}
    fig_html = "".join(f"<h3>{html.escape(k)}</h3><img src='data:image/png;base64,{v}'>" for k, v in figs.items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.warn{{background:#fff3cd;padding:8px}}
img{{max-width:100%}}code{{background:#f4f4f4}}</style></head><body>
<h1>{html.escape(title)}</h1>{preface}{warn}
<h2>Metrics</h2>{_table(results)}
<p>FID (eigenvalue formulation) and MMD (Gaussian kernel, median bandwidth, unbiased) on features of
<code>{html.escape(s['features'])}</code>; localized = crop to the maximum organ bounding box of the original
masks, box (D, H, W) = <code>{s['localized_box']}</code>, applied to real and synthetic volumes alike.
MS-SSIM over up to {s['n_pairs']} random pairs (seed {s['seed']}), kernel {s['ms_ssim']['kernel_size']},
{s['ms_ssim']['scales']} scales; lower = more diverse. Memorised = synthetic volumes closer to a training volume
than any held-out real volume is. Real held-out N = {results['real']['n']}, training N = {results['real']['n_train']}.</p>
{_floor_table(results)}{_anatomy_table(results)}{_reconstruction_table(results)}
<h2>Figures</h2>{fig_html}
<h2>Versions</h2><pre>{html.escape(str(results['versions']))}</pre>
</body></html>"""
    write_text(out / "report.html", doc)
    return out / "report.html"
