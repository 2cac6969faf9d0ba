"""``lad evaluate``: realism, diversity, coverage, memorisation and intensity realism of synthetic CT.

Real data: a prepared dataset (its ``test`` split is the held-out real set, its ``train`` split the
memorisation reference and the source of the original masks for the localized crop). Synthetic
data: one or more ``lad sample`` folders (``name=path`` to label them, e.g. ``V0=... Lad=...``).
Outputs ``metrics.json`` (every number with N, extractor, crop box, settings, versions) and a
self-contained ``report.html``. The automatic anatomy and realism checks (``lad.evaluation.anatomy``:
anatomy present with ``segmenter``, body outline, spine bone, per-tissue HU Wasserstein-1) are scored
for every set and for the real windows themselves (the ceiling); the VQ-GAN reconstruction report of
each set's run folder (``RUN/vqgan_reconstruction.json``, written by ``lad train vqgan``) is carried over.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad.data.labels import hu_to_unit
from lad.evaluation.anatomy import AnatomyReference, hu_w1
from lad.evaluation.features import FeatureExtractor
from lad.evaluation.crops import apply_box, max_bounding_box
from lad.evaluation.diversity import pairwise_ms_ssim
from lad.evaluation.memorisation import memorisation_report
from lad.evaluation.realism import fid, mmd, prdc
from lad.sampling.generate import selection_summary
from lad.utils.atomic import write_json
from lad.utils.log import get_logger

__all__ = ["evaluate", "load_synthetic", "parse_synthetic_args"]

log = get_logger(__name__)


def parse_synthetic_args(items: list[str]) -> dict[str, Path]:
    """``["V0=path", "path2"]`` -> ``{"V0": path, "path2-name": path2}``."""
    out: dict[str, Path] = {}
    for it in items:
        name, _, path = it.partition("=") if "=" in it else (Path(it).name, "", it)
        out[name] = Path(path)
    return out


def _real_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A seeded split of the ``n`` real windows into two halves (None below 4 windows): the real-vs-real floor."""
    if n < 4:
        return None
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def _feature_distances(fa, fb, fa_loc, fb_loc) -> dict[str, float]:
    """Holistic and localized FID and MMD between two feature sets."""
    return {"fid": fid(fa, fb).value, "mmd": mmd(fa, fb).value, "fid_localized": fid(fa_loc, fb_loc).value,
            "mmd_localized": mmd(fa_loc, fb_loc).value}


def load_synthetic(folder: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Volumes in [0, 1] ``(1, D, H, W)`` and their conditioning masks ``(D, H, W)`` from a sample folder."""
    import SimpleITK as sitk

    from lad.data.io import load_npy, read_pair

    manifest = folder / "manifest.jsonl"
    if not manifest.exists():
        raise FileNotFoundError(f"{folder}: not a lad sample folder (no manifest.jsonl)")
    vols, masks = [], []
    for line in manifest.read_text().splitlines():
        rec = json.loads(line)
        ct, mk = folder / rec["files"]["ct"], folder / rec["files"]["mask"]
        if ct.suffix == ".npy":
            hu, m = load_npy(ct), load_npy(mk)
        else:
            img, lab = read_pair(ct, mk)
            hu, m = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)
        vols.append(hu_to_unit(hu)[None])
        masks.append(m.astype(np.uint8))
    if len(vols) < 2:
        raise ValueError(f"{folder}: needs at least two synthetic volumes to evaluate")
    return vols, masks


def _real(prepared: Path, split: str):
    from lad.data.dataset import PreparedDataset

    ds = PreparedDataset(prepared, split=split)
    vols = [ds[i]["image"] for i in range(len(ds))]
    masks = [ds[i]["mask"][0] for i in range(len(ds))]
    organs = [ds[i]["organs"][0] for i in range(len(ds))]
    return ds, vols, masks, organs


def _hu_hist(vols: list[np.ndarray], masks: list[np.ndarray], label_sel, bins: np.ndarray) -> list[float]:
    from lad.data.labels import unit_to_hu

    vals = [unit_to_hu(v[0])[label_sel(m)] for v, m in zip(vols, masks)]
    vals = np.concatenate(vals) if vals else np.zeros(0)
    counts, _ = np.histogram(vals, bins=bins)
    if counts.sum() == 0:  # no voxel of the label in range: an empty histogram, not NaNs
        return np.zeros(len(bins) - 1).tolist()
    return (counts / counts.sum() / np.diff(bins)).tolist()


def check_evaluate_args(real: str | Path, synthetic: dict[str, Path], out: str | Path, *, overwrite: bool = False) -> None:
    """Refuse, before anything is created: a missing real or synthetic folder, a report folder holding a
    report (``metrics.json`` / ``report.html``) without ``overwrite``."""
    from lad.utils.atomic import OutputExistsError

    if not (Path(real) / "manifest.json").exists():
        raise FileNotFoundError(f"{real}: not a prepared dataset (no manifest.json; run `lad prepare` first)")
    for name, folder in synthetic.items():
        if not (Path(folder) / "manifest.jsonl").exists():
            raise FileNotFoundError(f"{folder}: not a lad sample folder (no manifest.jsonl; run `lad sample` first)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    held = [f for f in ("metrics.json", "report.html") if (out / f).exists()]
    if held and not overwrite:
        raise OutputExistsError(f"{out}: already holds {' and '.join(held)}; pass --overwrite to replace them "
                                "(the feature cache is reused) or choose another --out")


def evaluate(real: str | Path, synthetic: dict[str, Path], out: str | Path, *, features: str = "random-resnet10",
             n_pairs: int = 400, seed: int = 0, device: str = "cpu", overwrite: bool = False,
             segmenter: str | Path | None = None, ellipses: str = "least-squares", n_boot: int = 200,
             progress_bar: bool = True) -> dict[str, Any]:
    """Compute every metric for each synthetic set against the real prepared dataset; write the report.

    ``ellipses``: the MDS figure's, "least-squares" fits (the paper's) or "2-sigma" (``report.fit_ellipse``).
    ``features``: a ``lad features train`` folder (in-domain) or a ``FeatureExtractor.from_spec`` string.
    ``n_boot``: bootstrap replicates of each metric's 95 % interval (``X_ci95`` beside ``X``; 0 = none).
    """
    from lad.evaluation.report import ELLIPSES
    from lad.evaluation.uncertainty import add_intervals, bootstrap_settings, mean_ci
    from lad.utils.atomic import prepare_output_dir

    if n_boot < 0:
        raise ValueError(f"--bootstrap must be >= 0 (0: no intervals), got {n_boot}")
    if ellipses not in ELLIPSES:
        raise ValueError(f"ellipses must be one of {ELLIPSES}, got {ellipses!r}")
    t0 = time.perf_counter()
    check_evaluate_args(real, synthetic, out, overwrite=overwrite)
    out = prepare_output_dir(out, resume=True)  # the feature cache (keyed by content) is kept, even with overwrite
    real = Path(real)
    _, real_vols, real_masks, real_organs = _real(real, "test")
    train_ds, train_vols, train_masks, _ = _real(real, "train")
    real_split = "test"
    if len(real_vols) < 2:
        real_split = "train (fewer than two test windows)"
        log.warning("%s: fewer than two held-out (test) windows; using the training windows as the real set", real)
        real_vols, real_masks, real_organs = train_vols, train_masks, [train_ds[i]["organs"][0] for i in range(len(train_ds))]
    box = max_bounding_box(train_masks)
    fx = FeatureExtractor.from_spec(str(features), device=device)
    _check_feature_split(fx, real)
    cache = out / "feature_cache"
    bars = {"progress_bar": progress_bar}
    f_real = fx.extract(real_vols, n=len(real_vols), cache_dir=cache, **bars)
    f_real_loc = fx.extract([apply_box(v, box) for v in real_vols], n=len(real_vols), **bars)
    f_train = fx.extract(train_vols, n=len(train_vols), cache_dir=cache, **bars)
    real_div = pairwise_ms_ssim([v[0] for v in real_vols], n_pairs=n_pairs, seed=seed, **bars)
    bins = np.linspace(-200, 300, 51)
    seg = None
    if segmenter is not None:
        from lad.evaluation.fidelity import load_segmenter

        seg = load_segmenter(segmenter, device)
    ref, real_checks = _anatomy_reference(real_vols, real_masks, seg, device)
    results: dict[str, Any] = {
        "real": {"path": str(real), "n": len(real_vols), "n_train": len(train_vols), "ms_ssim": real_div.value,
                 "ms_ssim_ci95": mean_ci(real_div.details.pop("values"), n_boot=n_boot, seed=seed) if n_boot else None,
                 "ms_ssim_pairs": real_div.n_a,
                 "hu_hist": {"organ": _hu_hist(real_vols, real_masks, lambda m: m == 1, bins),
                             "liver": _hu_hist(real_vols, real_organs, lambda m: m == 1, bins)},
                 "split": real_split,
                 **ref.summarize(real_checks["checks"], n_boot=n_boot, seed=seed), **({"fidelity_dice": real_checks["fidelity"]} if seg is not None else {}),
                 **({"fidelity_dice_ci95": real_checks["fidelity_ci95"](n_boot, seed)} if seg is not None and n_boot else {})},
        "sets": {},
        "settings": {"features": fx.label, "features_kind": fx.kind, "features_trained_on": fx.trained_on and
                     {k: v for k, v in fx.trained_on.items() if k != "windows"}, "bootstrap": bootstrap_settings(n_boot, seed),
                     "pretrained_features": fx.is_pretrained, "localized_box": [[s.start, s.stop] for s in box],
                     "ms_ssim": real_div.details, "n_pairs": n_pairs, "seed": seed, "hu_bins": bins.tolist(),
                     "anatomy": ref.to_dict(), "mds_ellipses": ellipses},
        "versions": _versions(),
    }
    floor_idx = _real_halves(len(real_vols), seed)
    if floor_idx is not None:
        a, b = floor_idx
        results["real"]["floor"] = {**_feature_distances(f_real[a], f_real[b], f_real_loc[a], f_real_loc[b]),
                                    "n_a": len(a), "n_b": len(b)}
    embeds = {"real": f_real}
    figures_data = {}
    decoded: dict[Path, dict[str, Any]] = {}  # decoder ceiling per run (sets drawn from one run share it)
    for name, folder in synthetic.items():
        vols, masks = load_synthetic(Path(folder))
        f_syn = fx.extract(vols, n=len(vols), cache_dir=cache, **bars)
        f_syn_loc = fx.extract([apply_box(v, box) for v in vols], n=len(vols), **bars)
        div = pairwise_ms_ssim([v[0] for v in vols], n_pairs=n_pairs, seed=seed, **bars)
        r_fid, r_mmd = fid(f_real, f_syn), mmd(f_real, f_syn)
        l_fid, l_mmd = fid(f_real_loc, f_syn_loc), mmd(f_real_loc, f_syn_loc)
        entry = {
            "path": str(folder), "n": len(vols),
            "fid": r_fid.value, "mmd": r_mmd.value, "fid_localized": l_fid.value, "mmd_localized": l_mmd.value,
            "ms_ssim": div.value, "ms_ssim_pairs": div.n_a, "mmd_bandwidth": r_mmd.details["bandwidth"],
            "prdc": prdc(f_real, f_syn, k=min(5, len(f_real) - 1, len(f_syn) - 1)),
            "memorisation": memorisation_report(f_syn, f_train, f_real),
            "hu_hist": {"organ": _hu_hist(vols, masks, lambda m: m == 1, bins)},
            "n_features_dim": r_fid.details["feature_dim"], "mmd_localized_bandwidth": l_mmd.details["bandwidth"],
            "selection": selection_summary(Path(folder)),  # the optional median-HU redraws of `lad sample`
        }
        add_intervals(entry, f_real, f_syn, f_real_loc, f_syn_loc, ms_ssim_values=div.details["values"], n_boot=n_boot, seed=seed)
        if floor_idx is not None:  # like-for-like with the real-vs-real floor: the same half, the same N
            a, b = floor_idx
            k = min(len(a), len(vols))
            entry["vs_half"] = {**_feature_distances(f_syn[:k], f_real[b], f_syn_loc[:k], f_real_loc[b]), "n": k, "n_real": len(b)}
        scored = _score_set(ref, vols, masks, seg, device)
        entry.update(ref.summarize(scored["checks"], n_boot=n_boot, seed=seed))
        if seg is not None:
            entry["fidelity_dice"] = scored["fidelity"]
            if n_boot:
                entry["fidelity_dice_ci95"] = scored["fidelity_ci95"](n_boot, seed)
        entry["hu_w1"] = {k: _w1(scored["hu"][k], real_checks["hu"][k]) for k in ("organ", "body")}
        recon = _vqgan_reconstruction(Path(folder))
        if recon is not None:
            entry["vqgan_reconstruction"] = recon
        run = _sample_run(Path(folder))
        if seg is not None and run is not None and (run / "vqgan" / "model.safetensors").exists():
            if run not in decoded:
                decoded[run] = _decoder_ceiling(run, ref, real_vols, real_masks, real_checks, seg, device)
            entry["decoder_ceiling"] = decoded[run]
        results["sets"][name] = entry
        embeds[name] = f_syn
        figures_data[name] = (vols, masks)
    selections = {(e["selection"]["quality_check"], e["selection"]["max_retries"]) for e in results["sets"].values()}
    results["settings"]["selection_identical"] = len(selections) <= 1
    if len(selections) > 1:
        log.warning("the synthetic sets were sampled with different median-HU selection settings: their metrics are not "
                    "comparable (sample every set with the same --quality-check / --max-retries)")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "metrics.json", results)
    from lad.evaluation.report import closest_pairs_figure, write_report

    pairs = [(name, figures_data[name][0][p["synthetic"]], train_vols[p["train"]], p["distance"])
             for name, e in results["sets"].items() for p in e["memorisation"]["closest_pairs"][:2]]
    extra = {"Memorisation: closest synthetic-training pairs": closest_pairs_figure(pairs)} if pairs else {}
    write_report(out, results, embeds, figures_data, (real_vols, real_masks), box, extra_figures=extra, ellipses=ellipses)
    log.info("evaluation written to %s (%.1f s)", out, results["seconds"])
    return results


def _score_set(ref: AnatomyReference | None, vols: list[np.ndarray], masks: list[np.ndarray], seg, device) -> dict[str, Any]:
    """One pass over a set, one volume at a time: the anatomy checks against ``ref`` (None: not yet built),
    the segmenter's fidelity Dice against the conditioning masks, and HU samples inside the conditioning
    organ (mask label 1) and the body for the Wasserstein-1 distances."""
    from lad.data.labels import unit_to_hu
    from lad.evaluation.anatomy import HUSampler, body_component
    from lad.evaluation.fidelity import FidelityDice, segment

    fd = FidelityDice()
    hu_s = {"organ": HUSampler(), "body": HUSampler()}
    checks, labels, hus = [], [], []
    for v, m in zip(vols, masks):
        hu = unit_to_hu(v[0])
        pred = segment(seg, v, device) if seg is not None else None
        if pred is not None:
            fd.update(pred, m)
        body = body_component(hu)
        hu_s["organ"].add(hu, m == 1)
        hu_s["body"].add(hu, body)
        if ref is not None:
            checks.append(ref.check(hu, pred, body=body))
        else:
            labels.append(pred)
            hus.append(hu)
    return {"checks": checks, "fidelity": fd.value(), "fidelity_ci95": fd.ci95, "hu": hu_s, "labels": labels, "hus": hus}


def _w1(a, b) -> float | None:
    """Wasserstein-1 (HU) between two ``HUSampler``s; None when one holds no value (e.g. no body at all)."""
    va, vb = a.values(), b.values()
    return hu_w1(va, vb) if va.size and vb.size else None


def _anatomy_reference(real_vols: list[np.ndarray], real_masks: list[np.ndarray], seg, device):
    """The anatomy reference of the real windows and their own scores (the ceiling of every check)."""
    scored = _score_set(None, real_vols, real_masks, seg, device)
    ref = AnatomyReference.from_real(scored["hus"], scored["labels"] if seg is not None else None)
    labels = scored.pop("labels")  # None per window without a segmenter
    scored["checks"] = [ref.check(h, lab) for h, lab in zip(scored.pop("hus"), labels)]
    return ref, scored


def _sample_run(folder: Path) -> Path | None:
    """The run folder a sample folder was drawn from (``sampling.json``), if recorded."""
    settings = folder / "sampling.json"
    if not settings.exists():
        return None
    run = json.loads(settings.read_text(encoding="utf-8")).get("run")
    return Path(run) if run else None


def _vqgan_reconstruction(folder: Path) -> dict[str, Any] | None:
    """``RUN/vqgan_reconstruction.json`` of the run a sample folder was drawn from (``sampling.json``), if any."""
    run = _sample_run(folder)
    path = run / "vqgan_reconstruction.json" if run else None
    if path is None or not path.exists():
        return None
    return {**json.loads(path.read_text(encoding="utf-8")), "path": str(path)}


@torch.no_grad()
def _decoder_ceiling(run: Path, ref: AnatomyReference, real_vols: list[np.ndarray], real_masks: list[np.ndarray],
                     real_checks: dict[str, Any], seg, device) -> dict[str, Any]:
    """The anatomy checks and the fidelity Dice of the run's VQ-GAN reconstructions of the real windows.

    A sample is decoded by that VQ-GAN, so what its reconstructions of real windows score is the most the
    samples can score through it: the gap between this ceiling and the samples is the diffusion model's,
    the gap between the real windows and this ceiling the autoencoder's."""
    from lad.models.vqgan import VQGAN

    vqgan = VQGAN.from_pretrained(run / "vqgan", map_location=device).to(device).eval()
    recons = [vqgan(torch.from_numpy(np.asarray(v, np.float32))[None].to(device)).recon[0].clamp(0, 1).cpu().numpy()
              for v in real_vols]
    scored = _score_set(ref, recons, real_masks, seg, device)
    return {"run": str(run), "n": len(recons), **ref.summarize(scored["checks"]), "fidelity_dice": scored["fidelity"],
            "hu_w1": {k: _w1(scored["hu"][k], real_checks["hu"][k]) for k in ("organ", "body")}}


def _check_feature_split(fx: FeatureExtractor, real: Path) -> None:
    """In-domain features must not have seen the held-out windows they are now evaluated on."""
    if not fx.trained_on or Path(fx.trained_on.get("trained_on", "")).resolve() != real.resolve():
        return
    test_ids = _test_ids(real)
    if len(test_ids) < 2:
        log.warning("%s: fewer than two held-out windows, so the real set is the training split the in-domain features "
                    "were trained on: the numbers are optimistic", real)
    seen = set(fx.trained_on.get("windows", [])) & test_ids
    if seen:
        raise ValueError(f"--features was trained on {len(seen)} held-out (test) windows of {real} (e.g. {sorted(seen)[0]}); "
                         "train it on the training split only (`lad features train` reads only the train split)")


def _test_ids(real: Path) -> set[str]:
    from lad.data.dataset import PreparedDataset

    return {w["id"] for w in PreparedDataset(real, split="test").windows}


def _versions() -> dict[str, str]:
    import monai
    import torch

    import lad

    return {"lad": lad.__version__, "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
