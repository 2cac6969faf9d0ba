"""``lad demo``: the whole method end to end on the embedded phantom data.

Stages (each resumable; ``--from STAGE`` re-runs that stage and everything after it):

1. ``phantom``   procedural abdominal CT (no download)
2. ``prepare``   the paper's preprocessing with the demo preset (64 x 64 x 16 windows at 6 x 6 x 5 mm)
3. ``train``     Lad (variant full: Locality Loss + content + structure conditions): VQ-GAN, then diffusion
4. ``sample``    synthetic volumes from augmented masks (the paper's sampling) and from the original training
   masks (Table 2's other column), DDIM, guidance w = 1
5. ``baseline``  V0 (Medical Diffusion: no Locality Loss, no condition) on the same budget, and its samples (V0
   ignores the mask: its Dice against the masks is what a generator that draws the organ where it usually lies
   scores, the floor of the conditioning-fidelity Dice)
6. ``segmenter`` an organ segmenter (liver, kidney, spleen, pancreas, tumour) on the real training windows, for the
   conditioning-fidelity Dice and the anatomy-present check
7. ``features``  the in-domain feature network (``lad features train``) on the real training windows
8. ``evaluate``  both against the held-out phantom windows with those features; ``DIR/report.html``

After the stages, ``DIR/summary.json`` holds the headline numbers flat (``write_summary``).

The numbers are illustrative (tiny models, phantom data); the same commands with the paper presets
are the real thing.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import shutil
import time
from pathlib import Path

from lad.utils.atomic import atomic_path, write_text
from lad.utils.log import get_logger

__all__ = ["run_demo", "write_summary", "STAGES", "SUMMARY_KEYS"]

log = get_logger(__name__)

STAGES = ("phantom", "prepare", "train", "sample", "baseline", "segmenter", "features", "evaluate")

_PRESETS = {
    # phantom subjects (n, spacing, size, workers), prepare / train / segmenter presets, samples per model, DDIM steps, MS-SSIM pairs
    "demo": dict(n=150, spacing=(3.0, 3.0, 2.5), size=(128, 128), prepare="demo", train="demo", samples=16, steps=50, pairs=100,
                 segmenter="demo", segmenter_set=[], workers=2, features="demo"),
    "tiny": dict(n=6, spacing=(6.0, 6.0, 5.0), size=(64, 64), prepare="tiny", train="tiny", samples=4, steps=5, pairs=6,
                 segmenter="tiny", segmenter_set=["steps=30", "checkpoint_every=30"], workers=1, features="tiny"),
}


def _done(out: Path, stage: str) -> Path:
    return out / ".stages" / f"{stage}.done"


def run_demo(out: str | Path, *, preset: str = "demo", start: str | None = None, seed: int = 0, device: str = "cpu",
             progress_bar: bool = True) -> Path:
    """Run (or resume) the demo into ``out``; returns the path of ``report.html``. ``progress_bar=False``: no bars."""
    from lad.data.phantom import write_phantom_dataset
    from lad.data.prepare import load_prepare_config, prepare_dataset
    from lad.evaluation.evaluate import evaluate
    from lad.sampling.generate import SampleSettings, generate_samples
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    if preset not in _PRESETS:
        raise ValueError(f"--preset must be one of {list(_PRESETS)}, got {preset!r}")
    if start is not None and start not in STAGES:
        raise ValueError(f"--from must be one of {STAGES}, got {start!r}")
    p = _PRESETS[preset]
    out = Path(out)
    settings = {"preset": preset, "seed": seed}
    sfile = out / "demo_settings.json"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not sfile.exists())):
        raise FileExistsError(f"{out}: exists and is not a lad demo folder (no demo_settings.json); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    if sfile.exists() and json.loads(sfile.read_text()) != settings:
        raise FileExistsError(f"{out}: holds a demo run with other settings {json.loads(sfile.read_text())}; use another --out")
    write_text(sfile, json.dumps(settings))
    if start is not None:
        for s in STAGES[STAGES.index(start):]:
            _done(out, s).unlink(missing_ok=True)
    tfile = out / ".stages" / "timings.json"
    timings: dict[str, dict[str, float]] = {
        k: v for k, v in (json.loads(tfile.read_text()) if tfile.exists() else {}).items() if isinstance(v, dict)}

    def stage(name, fn):
        if _done(out, name).exists():
            log.info("demo: %s already done (use --from %s to redo it)", name, name)
            return
        log.info("demo: stage %s", name)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        # wall and CPU seconds (all threads of this process): on a shared machine the CPU figure is the stable one
        timings[name] = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
        log.info("demo: stage %s took %.0f s (%.0f CPU s)", name, timings[name]["wall_s"], timings[name]["cpu_s"])
        _done(out, name).parent.mkdir(parents=True, exist_ok=True)
        write_text(tfile, json.dumps(timings, indent=1))
        _done(out, name).write_text("ok")

    def clean(*paths):
        for q in paths:
            shutil.rmtree(out / q, ignore_errors=True)

    cfg_full = resolve_train_config(p["train"], variant="full", seed=seed)
    cfg_v0 = resolve_train_config(p["train"], variant="V0", seed=seed)
    sample = SampleSettings(n=p["samples"], steps=p["steps"], sampler="ddim", guidance=1.0, seed=seed)

    stage("phantom", lambda: write_phantom_dataset(out / "phantom", p["n"], seed, spacing=p["spacing"], size=p["size"],
                                                   preview=True, overwrite=True, workers=p["workers"], progress_bar=progress_bar))
    stage("prepare", lambda: (clean("prepared"), prepare_dataset("abdomenct1k", out / "phantom", out / "prepared",
                                                                 load_prepare_config(p["prepare"]), progress_bar=progress_bar)))

    def train(run, cfg):
        clean(run)
        train_vqgan(out / "prepared", out / run, cfg, device=device, progress_bar=progress_bar)
        train_diffusion(out / "prepared", out / run, cfg, device=device, progress_bar=progress_bar)

    stage("train", lambda: train("run-lad", cfg_full))
    original = dataclasses.replace(sample, augment="none")

    def sample_both(run: str, name: str):
        for folder, settings in ((f"samples-{name}", sample), (f"samples-{name}-original", original)):
            clean(folder)
            generate_samples(out / run, out / "prepared", out / folder, settings, device=device, batch_size=4,
                             progress_bar=progress_bar)

    stage("sample", lambda: sample_both("run-lad", "lad"))

    def baseline():
        train("run-v0", cfg_v0)
        sample_both("run-v0", "v0")

    stage("baseline", baseline)

    def segmenter():
        from lad.priors.train import load_segmenter_config, train_segmenter

        clean("segmenter")
        seg_cfg = load_segmenter_config(p["segmenter"], [f"seed={seed}", *p["segmenter_set"]])
        train_segmenter(out / "prepared", out / "segmenter", seg_cfg, device=device, progress_bar=progress_bar)

    stage("segmenter", segmenter)

    def features():
        from lad.evaluation.ct_features import load_feature_train_config, train_features

        train_features(out / "prepared", out / "features", load_feature_train_config(p["features"], [f"seed={seed}"]),
                       device=device, overwrite=True, progress_bar=progress_bar)

    stage("features", features)

    def evaluation():
        clean("evaluation")
        evaluate(out / "prepared", {name: out / folder for name, folder in _SETS.values()},
                 out / "evaluation", n_pairs=p["pairs"], seed=seed, device=device, segmenter=out / "segmenter",
                 features=str(out / "features"), progress_bar=progress_bar)
        _write_demo_report(out, preset, cfg_full, sample, timings, progress_bar=progress_bar)

    stage("evaluate", evaluation)
    write_summary(out)
    report = out / "report.html"
    log.info("demo report: %s", report)
    return report


SUMMARY_KEYS = ("vqgan_heldout_mae_hu", "vqgan_codes_used", "lad_anatomy_present_fraction", "v0_anatomy_present_fraction",
                "real_anatomy_present_fraction", "lad_body_ok_fraction", "lad_bone_ok_fraction", "lad_organ_hu_w1",
                "lad_fidelity_dice", "real_fidelity_dice", "wall_s", "cpu_s")
"""The keys ``OUT/summary.json`` always holds (numbers); it holds V0 counterparts and a few more besides."""

# summary key prefix -> (set name in metrics.json, sample folder); "_original": sampled from the training masks
_SETS = {"v0": ("V0 (Medical Diffusion)", "samples-v0"), "lad": ("Lad", "samples-lad"),
         "v0_original": ("V0, original masks", "samples-v0-original"),
         "lad_original": ("Lad, original masks", "samples-lad-original")}


def write_summary(out: str | Path) -> dict[str, float]:
    """``OUT/summary.json``: the demo's headline numbers, flat, from ``evaluation/metrics.json`` and
    ``.stages/timings.json`` (``wall_s`` / ``cpu_s``: totals over the stages).

    ``vqgan_*`` is Lad's VQ-GAN on the held-out windows (``v0_vqgan_*`` V0's); ``*_anatomy_present_fraction``
    the mean over liver, kidney and spleen; ``*_organ_hu_w1`` / ``*_body_hu_w1`` in HU; ``*_fidelity_dice`` the
    organ Dice. ``lad_*`` / ``v0_*``: samples from augmented masks (the paper's sampling); ``lad_original_*`` /
    ``v0_original_*``: from the original training masks (Table 2's other column). ``*_decoder_ceiling_*``: the
    model's VQ-GAN reconstructions of the held-out windows, scored like the samples (the most its samples can score). ``*_low`` / ``*_high``: the
    95 % interval of the number they suffix. A number that could not be measured (e.g. no body in any sample) is left out.
    """
    out = Path(out)
    m = json.loads((out / "evaluation" / "metrics.json").read_text())
    timings = [t for t in json.loads((out / ".stages" / "timings.json").read_text()).values() if isinstance(t, dict)]
    summary: dict[str, float | None] = {}

    def anatomy_mean(e: dict) -> float | None:
        a = e.get("anatomy")
        return a.get("mean_liver_kidney_spleen") if a else None

    for key, (name, _) in _SETS.items():
        e = m["sets"].get(name)
        if e is None:
            continue
        rec = e.get("vqgan_reconstruction") or {}
        if key in ("lad", "v0"):  # (the "_original" sets share their model's VQ-GAN)
            pre = "" if key == "lad" else "v0_"
            summary.update({f"{pre}vqgan_heldout_mae_hu": rec.get("mae_body_hu"), f"{pre}vqgan_heldout_bias_hu": rec.get("bias_body_hu"),
                            f"{pre}vqgan_codes_used": rec.get("codes_used"), f"{pre}vqgan_perplexity": rec.get("perplexity")})
        ceiling = e.get("decoder_ceiling") or {}
        if key in ("lad", "v0") and ceiling:  # its VQ-GAN's reconstructions of the held-out windows, scored alike
            summary.update({f"{key}_decoder_ceiling_anatomy_present_fraction": anatomy_mean(ceiling),
                            f"{key}_decoder_ceiling_fidelity_dice": (ceiling.get("fidelity_dice") or {}).get("organ"),
                            f"{key}_decoder_ceiling_bone_ok_fraction": ceiling.get("bone_ok_fraction"),
                            f"{key}_decoder_ceiling_organ_hu_w1": ceiling["hu_w1"]["organ"]})
        anat_ci = (e.get("anatomy") or {}).get("mean_liver_kidney_spleen_ci95") or [None, None]
        dice_ci = (e.get("fidelity_dice_ci95") or {}).get("organ") or [None, None]
        summary.update({f"{key}_anatomy_present_fraction_low": anat_ci[0], f"{key}_anatomy_present_fraction_high": anat_ci[1],
                        f"{key}_fidelity_dice_low": dice_ci[0], f"{key}_fidelity_dice_high": dice_ci[1]})
        summary.update({f"{key}_anatomy_present_fraction": anatomy_mean(e), f"{key}_body_ok_fraction": e.get("body_ok_fraction"),
                        f"{key}_bone_ok_fraction": e.get("bone_ok_fraction"), f"{key}_organ_hu_w1": e["hu_w1"]["organ"],
                        f"{key}_body_hu_w1": e["hu_w1"]["body"], f"{key}_fidelity_dice": (e.get("fidelity_dice") or {}).get("organ"),
                        f"{key}_fid": e["fid"], f"{key}_fid_localized": e["fid_localized"], f"{key}_n": e["n"]})
    real = m["real"]
    floor = real.get("floor") or {}
    summary.update({"real_floor_fid": floor.get("fid"), "real_floor_fid_localized": floor.get("fid_localized"),
                    "real_floor_mmd": floor.get("mmd"), "real_floor_n": floor.get("n_a")})
    for key, (name, _) in _SETS.items():
        half = (m["sets"].get(name) or {}).get("vs_half") or {}
        summary.update({f"{key}_fid_vs_half": half.get("fid"), f"{key}_fid_localized_vs_half": half.get("fid_localized"),
                        f"{key}_mmd_vs_half": half.get("mmd")})
    summary.update({"real_anatomy_present_fraction": anatomy_mean(real), "real_body_ok_fraction": real.get("body_ok_fraction"),
                    "real_bone_ok_fraction": real.get("bone_ok_fraction"),
                    "real_fidelity_dice": (real.get("fidelity_dice") or {}).get("organ"), "real_n": real["n"],
                    "wall_s": round(sum(t["wall_s"] for t in timings), 1),
                    "cpu_s": round(sum(t["cpu_s"] for t in timings), 1)})
    summary = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        log.warning("demo summary: no value for %s (see evaluation/metrics.json)", missing)
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def _curves_png(out: Path) -> str:
    """Training curves of both runs: VQ-GAN L1, codebook perplexity, diffusion loss (from ``RUN/logs/*.jsonl``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lad.evaluation.report import _png

    panels = (("vqgan", "l1", "VQ-GAN: L1 reconstruction loss"), ("vqgan", "perplexity", "VQ-GAN: codebook perplexity"),
              ("diffusion", "diffusion", "diffusion: denoising loss"))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.2))
    for run, name, color in (("run-lad", "Lad", "#d62728"), ("run-v0", "V0", "#1f77b4")):
        for ax, (part, key, title) in zip(axes, panels):
            f = out / run / "logs" / f"{part}.jsonl"
            if not f.exists():
                continue
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if key in r]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], color=color, label=name)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _settings_html(out: Path, preset: str, cfg, sample, timings: dict) -> str:
    """The pipeline's settings (data, budget of both runs, sampling) and where the time went, as HTML tables."""
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    c = manifest["config"]
    p = _PRESETS[preset]
    vq, vt, dn, dt = cfg.vqgan, cfg.vqgan_train, cfg.denoiser, cfg.diffusion_train
    rows = [
        ("data", f"{p['n']} phantom subjects ({p['size'][0]} x {p['size'][1]} at {_mm(p['spacing'])} mm) -> prepare preset "
                 f"<code>{p['prepare']}</code>: windows {c['depth']} x {c['size'][0]} x {c['size'][1]} at {_mm(c['spacing'])} mm; "
                 f"{_count(manifest, 'train')} training / {_count(manifest, 'test')} held-out windows"),
        ("VQ-GAN", f"channels {list(vq.channels)}, compression {list(vq.downsample)}, {vq.num_embeddings} codes of dim "
                   f"{vq.embedding_dim}; {vt.steps} steps, batch {vt.batch_size}, lr {vt.lr:g}, discriminators from step "
                   f"{vt.disc_start}; Locality Loss weight {vt.locality_weight:g} (Lad) / 0 (V0)"),
        ("diffusion", f"denoiser channels {list(dn.channels)}, attention {list(dn.attention_levels)}; {dt.steps} steps, batch "
                      f"{dt.batch_size}, lr {dt.lr:g}, EMA {dt.ema_decay:g}, {dt.timesteps} timesteps ({dt.schedule}); Lad "
                      f"conditioned on content + structure (p_uncond {dt.p_uncond:g}), V0 unconditional"),
        ("sampling", f"{sample.n} volumes per model, {sample.sampler.upper()}-{sample.steps}, guidance w = {sample.guidance:g}, "
                     f"mask augmentation {sample.augment}, seed {sample.seed}"),
        ("budget", "V0 (Medical Diffusion) gets exactly Lad's budget: the same preset, steps, batch sizes and models"),
    ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{v}</td></tr>" for k, v in rows)
    done = {s: t for s, t in timings.items() if s != "evaluate"}  # this report is written during the evaluate stage
    times = "".join(f"<tr><th>{html.escape(s)}</th><td>{t['wall_s']:.0f}</td><td>{t['cpu_s']:.0f}</td></tr>" for s, t in done.items())
    total_w = sum(t["wall_s"] for t in done.values())
    total_c = sum(t["cpu_s"] for t in done.values())
    times += f"<tr><th>total</th><td>{total_w:.0f}</td><td>{total_c:.0f}</td></tr>"
    return (f"<h2>Pipeline settings</h2><table>{table}</table>"
            f"<h3>Time per stage</h3><table><tr><th>stage</th><th>wall s</th><th>CPU s (all threads)</th></tr>{times}</table>"
            "<p>Without the evaluate stage (this report is written during it; see <code>.stages/timings.json</code>).</p>")


def _mm(spacing) -> str:
    return " x ".join(f"{v:g}" for v in spacing)


def _count(manifest: dict, split: str) -> int:
    return sum(1 for w in manifest["windows"] if w["split"] == split)


def _write_demo_report(out: Path, preset: str, cfg, sample, timings: dict, progress_bar: bool = True) -> None:
    """``DIR/report.html``: the evaluation report with the pipeline's settings, stage times and training curves first."""
    from lad.config import to_dict
    from lad.data.dataset import PreparedDataset
    from lad.evaluation.crops import max_bounding_box
    from lad.evaluation.evaluate import load_synthetic
    from lad.evaluation.features import FeatureExtractor
    from lad.evaluation.report import closest_pairs_figure, write_report

    results = json.loads((out / "evaluation" / "metrics.json").read_text())
    preface = (
        "<p class=warn><b>What these numbers are</b>: small models trained for minutes on procedural phantom CT at 6 mm, "
        f"scored against {_count(json.loads((out / 'prepared' / 'manifest.json').read_text()), 'test')} held-out phantom "
        "windows with features trained on the phantom training windows only. Read each number against its reference: "
        "the brackets are 95 % bootstrap intervals over the volumes, the real-vs-real floor is what a generator "
        "indistinguishable from the real windows would score at this N, and the real row of the anatomy checks is "
        "their ceiling. They are phantom results, not the paper's: the same commands with the paper presets "
        "(<code>--preset paper-abdomenct1k</code>) on real CT are the real experiment.</p>"
        + _settings_html(out, preset, cfg, sample, timings)
        + f"<details><summary>full training config (Lad; V0 identical but variant V0)</summary>"
        f"<pre>{html.escape(json.dumps(to_dict(cfg), indent=1))}</pre></details>"
        f"<h2>Training curves</h2><img src='data:image/png;base64,{_curves_png(out)}'>"
    )
    ds_test = PreparedDataset(out / "prepared", split="test")
    ds_train = PreparedDataset(out / "prepared", split="train")
    real = ([ds_test[i]["image"] for i in range(len(ds_test))], [ds_test[i]["mask"][0] for i in range(len(ds_test))])
    train_vols = [ds_train[i]["image"] for i in range(len(ds_train))]
    real_label = "real (held-out)"
    if len(real[0]) < 2:  # as evaluate() does: the training windows are the real set
        real = (train_vols, [ds_train[i]["mask"][0] for i in range(len(ds_train))])
        real_label = "real (training)"
    box = max_bounding_box([ds_train[i]["mask"][0] for i in range(len(ds_train))])
    fx = FeatureExtractor.from_spec(str(out / "features"))  # what evaluate() used
    sets = {name: load_synthetic(Path(e["path"])) for name, e in results["sets"].items()}
    cache = out / "evaluation" / "feature_cache"
    embeds = {"real": fx.extract(real[0], cache_dir=cache, progress_bar=progress_bar)}
    embeds.update({name: fx.extract(v[0], cache_dir=cache, progress_bar=progress_bar) for name, v in sets.items()})
    pairs = [(name, sets[name][0][p["synthetic"]], train_vols[p["train"]], p["distance"])
             for name, e in results["sets"].items() for p in e["memorisation"]["closest_pairs"][:2]]
    extra = {"Memorisation: closest synthetic-training pairs": closest_pairs_figure(pairs)} if pairs else {}
    write_report(out, results, embeds, sets, real, box, title="lad demo: Lad vs Medical Diffusion (V0) on phantom CT",
                 preface=preface, extra_figures=extra)
    paper_sets = {name: v for name, v in sets.items() if not name.endswith("original masks")}  # the paper's sampling
    _write_overview_png(out / "figures" / "overview.png", paper_sets, real, real_label=real_label)


def _write_overview_png(path: Path, sets: dict, real: tuple, *, real_label: str = "real (held-out)", n: int = 6) -> None:
    """A PNG for sharing (README): one row per set (held-out real, then each model), the middle slice of its
    first ``n`` volumes with the organ contour. The first volumes of each set, not selected ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lad.data.labels import unit_to_hu
    from lad.evaluation.report import SOFT_TISSUE_WINDOW, ct_panel

    rows = {real_label: real, **dict(reversed(list(sets.items())))}
    rows = {name: (list(v[0][:n]), list(v[1][:n])) for name, v in rows.items()}
    cols = max(len(v[0]) for v in rows.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.0 * len(rows)), squeeze=False)
    for r, (name, (vols, masks)) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(vols):
                ax.axis("off")
                continue
            z = vols[c].shape[1] // 2
            ct_panel(ax, unit_to_hu(vols[c][0, z]), masks[c][z])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    lo, hi = SOFT_TISSUE_WINDOW
    fig.suptitle(f"middle slice of the first {cols} volumes of each set (window {lo}..{hi} HU; cyan: organ mask)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
