"""Sampling speed and the quality cost of fewer steps: DDPM-300 vs DDIM-50; quality against steps for every
sampler (``--quality``); seconds per volume and peak memory against the batch size (``--batch-curve``).

On a trained run (the demo shape, or any run folder):

    .venv/bin/python benchmarks/bench_sampling.py --run RUN --data PREPARED [--n 8] [--threads 1] [--device cuda]

prints seconds per volume (whole pipeline through ``lad.sampling.generate.generate_samples``:
augmented masks, conditions, guided denoising loop, decoding, NIfTI writing) and the peak RSS for each
sampler, then FID / MMD / MS-SSIM of each sample set against the held-out real windows (``lad evaluate``,
same extractor): the DDIM speed-up with its price.

At the paper's shape (image 1x32x256x256, latent 8x8x64x64, the paper preset's 41.8 M denoiser,
704-d condition) from an UNTRAINED pipeline (speed only; no weights are needed or implied):

    .venv/bin/python benchmarks/bench_sampling.py --paper-untrained [--threads 1] [--device cuda]

Denoising steps cost the same for both samplers (one guided forward of batch 2 per step; the scheduler
update is negligible), so this mode times the real ``LadPipeline.__call__`` with k1 and k2 DDIM steps and
solves ``T(k) = fixed + k * per_step`` (fixed = conditions + decoding) for per_step and fixed, then
reports ``fixed + 50 * per_step`` and ``fixed + 300 * per_step`` per volume, labelled "derived": a
full DDPM-300 volume at this shape is about 15 minutes of one CPU core. ``--full`` runs both samplers
end to end instead.

Quality against steps (``--quality``): a DDPM-trained run (epsilon or v) sampled with DDPM-300, DDIM 50/25/10 and
DPM-Solver++(2M) 20/10, and a rectified-flow run with Euler 30/10/5 (step counts above a run's training steps are
cut to them; either run may be left out: ``RUN_EPS,`` or ``,RUN_RF``), each set timed (seconds per volume,
``lad sample``'s pipeline) and scored by ``lad.evaluation.evaluate.evaluate`` in one call (anatomy present
fraction, organ HU W1, fidelity Dice with a segmenter, in-domain FID with its bootstrap interval with a features
folder); writes ``OUT/quality_vs_steps.{csv,md,png}``:

    .venv/bin/python benchmarks/bench_sampling.py --quality RUN_EPS,RUN_RF --prepared P --segmenter S --features F \
        [--n 16] [--batch-size 4] [--out /tmp/bench-sampling-quality]

Batch-size curve (``--batch-curve``): one fresh process per batch size (its own peak RSS), each timing one
pipeline call of B volumes after a warm-up call; the untrained ``--preset`` pipeline at its shape (``demo``:
image 1x16x64x64, latent 8x4x16x16; speed only), or a trained ``--run``:

    .venv/bin/python benchmarks/bench_sampling.py --batch-curve [--batches 1,2,4,8] [--preset demo] [--run RUN] \
        [--sampler ddim --steps 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import context, cuda_peak_gb, emit, in_child, peak_rss_gb, set_threads, sync  # noqa: E402

# (sampler, steps) of --quality: the paper's DDPM-300, ours below it; "eps" needs a DDPM-trained run, "rf" a
# rectified-flow one
QUALITY_CONFIGS = (("eps", "ddpm", 300), ("eps", "ddim", 50), ("eps", "ddim", 25), ("eps", "ddim", 10),
                   ("eps", "dpmpp2m", 20), ("eps", "dpmpp2m", 10), ("rf", "euler", 30), ("rf", "euler", 10), ("rf", "euler", 5))
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)", "euler": "RF Euler"}
QUALITY_COLUMNS = ("label", "sampler", "steps", "run", "prediction", "n", "seconds_per_volume", "cpu_seconds_per_volume",
                   "anatomy_present", "organ_hu_w1", "fidelity_dice", "fid", "fid_ci95_low", "fid_ci95_high")


def trained(a) -> None:
    from lad.evaluation.evaluate import evaluate
    from lad.sampling.generate import SampleSettings, generate_samples

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    sets, secs = {}, {}
    # warm-up (not timed): the first call pays one-off imports (MONAI transforms, NIfTI writers) and allocator
    # growth, which would otherwise be charged to whichever sampler runs first
    generate_samples(a.run, a.data, out / "warmup", SampleSettings(n=1, sampler="ddim", steps=2, quality_check=False),
                     device=a.device, batch_size=1)
    for sampler, steps in (("ddim", 50), ("ddpm", 300)):
        ctx = context(a.device)
        folder = out / f"{sampler}{steps}"
        t, c = time.perf_counter(), time.process_time()
        generate_samples(a.run, a.data, folder, SampleSettings(n=a.n, sampler=sampler, steps=steps, quality_check=False),
                         device=a.device, batch_size=a.batch_size)
        sync(a.device)
        wall, cpu = (time.perf_counter() - t) / a.n, (time.process_time() - c) / a.n
        sets[f"{sampler.upper()}-{steps}"] = folder
        secs[sampler] = cpu
        emit("sampling", run=str(a.run), sampler=sampler, steps=steps, n=a.n, batch_size=a.batch_size, seconds_per_volume=round(wall, 3),
             cpu_seconds_per_volume=round(cpu, 3), peak_rss_gb=peak_rss_gb(), cuda_peak_gb=cuda_peak_gb(a.device), **ctx)
    emit("sampling_speedup_ddim50_vs_ddpm300", run=str(a.run), batch_size=a.batch_size, speedup_cpu=round(secs["ddpm"] / secs["ddim"], 2),
         target=5.0, met=secs["ddpm"] / secs["ddim"] >= 5.0, note="ratio from one run (CPU seconds)")
    if a.no_quality:
        return
    res = evaluate(a.data, sets, out / "evaluation", n_pairs=a.pairs, device=a.device)
    for name, e in res["sets"].items():
        emit("sampler_quality", set=name, n=e["n"], n_real=res["real"].get("n"), fid=round(e["fid"], 5), mmd=round(e["mmd"], 5),
             fid_localized=round(e["fid_localized"], 5), ms_ssim=round(e["ms_ssim"], 4),
             real_ms_ssim=round(res["real"]["ms_ssim"], 4), features=res["settings"]["features"])


def untrained_paper_pipeline(device: str):
    """The paper preset's VQ-GAN, Condition Extractor, denoiser and scheduler, randomly initialised."""
    import torch

    from lad.models.condition import ConditionExtractor
    from lad.models.denoiser import LatentDenoiser
    from lad.models.vqgan import VQGAN
    from lad.sampling.pipeline import LadPipeline
    from lad.schedulers import DDPMScheduler
    from lad.training.config import resolve_train_config

    cfg = resolve_train_config("paper-abdomenct1k", [])
    torch.manual_seed(0)
    v, d = cfg.vqgan, cfg.denoiser
    vq = VQGAN(channels=tuple(v.channels), downsample=tuple(v.downsample), embedding_dim=v.embedding_dim,
               num_embeddings=v.num_embeddings, norm_num_groups=v.norm_num_groups).eval()
    cond = ConditionExtractor(latent_channels=v.embedding_dim, latent_shape=(8, 64, 64), num_slices=32,
                              structure_dim=cfg.condition.structure_dim).eval()
    den = LatentDenoiser(in_channels=v.embedding_dim, out_channels=v.embedding_dim, channels=tuple(d.channels),
                         attention_levels=tuple(d.attention_levels), num_res_blocks=d.num_res_blocks,
                         num_head_channels=d.num_head_channels, norm_num_groups=d.norm_num_groups, cond_dim=cond.cond_dim).eval()
    stats = {"shift": [0.0] * 8, "scale": [1.0] * 8, "latent_shape": [8, 8, 64, 64], "image_shape": [32, 256, 256]}
    pipe = LadPipeline(vqgan=vq.to(device), denoiser=den.to(device), scheduler=DDPMScheduler(num_train_timesteps=300),
                       latent_stats=stats, condition=cond.to(device), device=device)
    return pipe, sum(p.numel() for p in den.parameters())


def paper_untrained(a) -> None:
    import torch

    pipe, params = untrained_paper_pipeline(a.device)
    mask = torch.zeros(1, 1, 32, 256, 256, dtype=torch.uint8)
    mask[:, :, 8:24, 100:150, 90:170] = 1
    mask[:, :, 12:18, 115:130, 110:130] = 2
    ctx = context(a.device)

    def run(sampler, steps):
        t, c = time.perf_counter(), time.process_time()
        pipe(mask, seeds=[0], sampler=sampler, steps=steps)
        sync(a.device)
        return time.perf_counter() - t, time.process_time() - c

    base = {"image": "1x32x256x256", "latent": "8x8x64x64", "denoiser_params_m": round(params / 1e6, 2), "guidance": 1.0,
            "batch": 1, "untrained": True}
    if a.full:
        res = {}
        for sampler, steps in (("ddim", 50), ("ddpm", 300)):
            w, c = run(sampler, steps)
            res[sampler] = c
            emit("sampling_paper_shape", **base, sampler=sampler, steps=steps, seconds_per_volume=round(w, 2),
                 cpu_seconds_per_volume=round(c, 2), peak_rss_gb=peak_rss_gb(), cuda_peak_gb=cuda_peak_gb(a.device), **ctx)
        emit("sampling_speedup_ddim50_vs_ddpm300", **base, speedup_cpu=round(res["ddpm"] / res["ddim"], 2), target=5.0,
             met=res["ddpm"] / res["ddim"] >= 5.0, **ctx)
        return
    run("ddim", 1)  # warm-up
    k1, k2 = a.k
    w1, c1 = run("ddim", k1)
    w2, c2 = run("ddim", k2)
    per_w, per_c = (w2 - w1) / (k2 - k1), (c2 - c1) / (k2 - k1)
    fix_w, fix_c = w1 - k1 * per_w, c1 - k1 * per_c
    out = {}
    for sampler, steps in (("ddim", 50), ("ddpm", 300)):
        out[sampler] = fix_c + steps * per_c
        emit("sampling_paper_shape", **base, sampler=sampler, steps=steps, derived=True,
             seconds_per_volume=round(fix_w + steps * per_w, 1), cpu_seconds_per_volume=round(fix_c + steps * per_c, 1),
             per_step_cpu_s=round(per_c, 3), fixed_cpu_s=round(fix_c, 2), measured_ddim_steps=[k1, k2],
             measured_cpu_s=[round(c1, 2), round(c2, 2)], peak_rss_gb=peak_rss_gb(), cuda_peak_gb=cuda_peak_gb(a.device), **ctx)
    emit("sampling_speedup_ddim50_vs_ddpm300", **base, derived=True, speedup_cpu=round(out["ddpm"] / out["ddim"], 2), target=5.0,
         met=out["ddpm"] / out["ddim"] >= 5.0, **ctx)


def _run_schedule(run: Path) -> dict:
    from lad.schedulers import load_scheduler

    return load_scheduler(Path(run) / "scheduler").config


def quality_plan(runs: dict[str, Path | None]) -> list[dict]:
    """The (label, run, sampler, steps) of every ``QUALITY_CONFIGS`` entry whose run is given; steps cut to the
    run's training steps. Raises ValueError when a run's objective does not fit its samplers."""
    from lad.schedulers import RECTIFIED_FLOW, check_sampler

    plan = []
    for kind, run in runs.items():
        if run is None:
            continue
        cfg = _run_schedule(run)
        if (cfg["prediction_type"] == RECTIFIED_FLOW) != (kind == "rf"):
            want = "a rectified-flow run (diffusion_train.prediction=rectified_flow)" if kind == "rf" else "a DDPM-trained run"
            raise ValueError(f"--quality: {run} was trained with {cfg['prediction_type']!r}; the {'second' if kind == 'rf' else 'first'} "
                             f"run must be {want}")
        for k, sampler, steps in QUALITY_CONFIGS:
            if k != kind:
                continue
            check_sampler(cfg["prediction_type"], sampler)
            n = min(steps, int(cfg["num_train_timesteps"]))
            label = f"{SAMPLER_NAMES[sampler]}-{n}"
            if label not in {p["label"] for p in plan}:
                plan.append({"label": label, "run": Path(run), "sampler": sampler, "steps": n, "prediction": cfg["prediction_type"]})
    return plan


def _ci(entry: dict, key: str) -> tuple[float | None, float | None]:
    ci = entry.get(f"{key}_ci95")
    return (ci[0], ci[1]) if ci else (None, None)


def quality_rows(plan: list[dict], metrics: dict, timing: dict[str, dict]) -> list[dict]:
    """One row per sample set: its settings, seconds per volume and the metrics ``lad evaluate`` computed."""
    rows = []
    for p in plan:
        e = metrics["sets"][p["label"]]
        lo, hi = _ci(e, "fid")
        rows.append({"label": p["label"], "sampler": p["sampler"], "steps": p["steps"], "run": str(p["run"]),
                     "prediction": p["prediction"], "n": e["n"], **timing[p["label"]],
                     "anatomy_present": (e.get("anatomy") or {}).get("mean_liver_kidney_spleen"),
                     "organ_hu_w1": (e.get("hu_w1") or {}).get("organ"),
                     "fidelity_dice": (e.get("fidelity_dice") or {}).get("organ"),
                     "fid": e.get("fid"), "fid_ci95_low": lo, "fid_ci95_high": hi})
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def write_quality_tables(rows: list[dict], real: dict, out: Path, settings: dict) -> None:
    """``quality_vs_steps.csv`` (one row per set, ``QUALITY_COLUMNS``) and ``quality_vs_steps.md`` (the same with
    the held-out real windows' own values: the ceiling, and the real-vs-real FID floor)."""
    with open(out / "quality_vs_steps.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=QUALITY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    ra = (real.get("anatomy") or {}).get("mean_liver_kidney_spleen")
    rf = (real.get("fidelity_dice") or {}).get("organ")
    floor = (real.get("floor") or {}).get("fid")
    lines = [f"Quality against sampling steps: {settings['n']} volumes per set, features {settings['features']}, "
             f"segmenter {settings['segmenter'] or 'none'}, {settings['device']}, batch {settings['batch_size']}, "
             f"{settings['threads']} thread(s), load average {settings['load_avg_1min']} at the start, {settings['date_utc']}.", "",
             "| sampler | steps | run | s / volume (wall) | CPU s / volume | anatomy present | organ HU W1 (HU) | fidelity Dice | FID [95 % CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f" [{_fmt(r['fid_ci95_low'], '.3g')}, {_fmt(r['fid_ci95_high'], '.3g')}]" if r["fid_ci95_low"] is not None else ""
        lines.append(f"| {SAMPLER_NAMES[r['sampler']]} | {r['steps']} | {Path(r['run']).name} ({r['prediction']}) | "
                     f"{r['seconds_per_volume']:.3f} | {r['cpu_seconds_per_volume']:.3f} | {_fmt(r['anatomy_present'], '.2f')} | "
                     f"{_fmt(r['organ_hu_w1'], '.1f')} | {_fmt(r['fidelity_dice'], '.2f')} | {_fmt(r['fid'], '.4g')}{ci} |")
    lines.append(f"| held-out real windows | | | | | {_fmt(ra, '.2f')} | 0 | {_fmt(rf, '.2f')} | floor {_fmt(floor, '.4g')} |")
    (out / "quality_vs_steps.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_quality(rows: list[dict], real: dict, path: Path) -> None:
    """One panel per metric against the number of denoiser passes (log scale), one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = (("seconds_per_volume", "seconds per volume (wall)", None), ("anatomy_present", "anatomy present", "anatomy"),
              ("organ_hu_w1", "organ HU W1 (HU)", None), ("fidelity_dice", "fidelity Dice", "fidelity_dice"), ("fid", "FID", "floor"))
    colours = {"ddpm": "#1f77b4", "ddim": "#ff7f0e", "dpmpp2m": "#2ca02c", "euler": "#d62728"}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.1))
    for ax, (key, title, ceiling) in zip(axes, panels):
        for sampler in colours:
            sel = sorted((r for r in rows if r["sampler"] == sampler and r.get(key) is not None), key=lambda r: r["steps"])
            if not sel:
                continue
            x, y = [r["steps"] for r in sel], [r[key] for r in sel]
            if key == "fid" and all(r["fid_ci95_low"] is not None for r in sel):
                err = [[max(0.0, v - r["fid_ci95_low"]) for v, r in zip(y, sel)], [max(0.0, r["fid_ci95_high"] - v) for v, r in zip(y, sel)]]
                ax.errorbar(x, y, yerr=err, fmt="o-", color=colours[sampler], label=SAMPLER_NAMES[sampler], capsize=2)
            else:
                ax.plot(x, y, "o-", color=colours[sampler], label=SAMPLER_NAMES[sampler])
        ref = None
        if ceiling == "anatomy":
            ref = (real.get("anatomy") or {}).get("mean_liver_kidney_spleen")
        elif ceiling == "fidelity_dice":
            ref = (real.get("fidelity_dice") or {}).get("organ")
        elif ceiling == "floor":
            ref = (real.get("floor") or {}).get("fid")
        if ref is not None:
            ax.axhline(ref, color="gray", ls="--", lw=0.8, label="real" if ceiling != "floor" else "real-vs-real floor")
        ax.set_xscale("log")
        ticks = sorted({r["steps"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("denoiser passes (steps)", fontsize=8)
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality(a) -> list[dict]:
    """``--quality``: sample every planned set, evaluate them together, write the tables and the plot."""
    from lad.evaluation.evaluate import evaluate
    from lad.sampling.generate import SampleSettings, generate_samples

    parts = [p.strip() for p in a.quality.split(",")]
    if len(parts) != 2 or not any(parts):
        raise SystemExit("--quality takes RUN_EPS,RUN_RF (either may be empty: RUN_EPS, or ,RUN_RF)")
    plan = quality_plan({"eps": Path(parts[0]) if parts[0] else None, "rf": Path(parts[1]) if parts[1] else None})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = context(a.device)
    warmed, timing, sets = set(), {}, {}
    for p in plan:
        if p["run"] not in warmed:  # one-off imports and allocator growth, charged to no sampler
            generate_samples(p["run"], a.prepared, out / "warmup", SampleSettings(n=1, sampler=p["sampler"], steps=2, quality_check=False),
                             device=a.device, batch_size=1, overwrite=True)
            shutil.rmtree(out / "warmup", ignore_errors=True)
            warmed.add(p["run"])
        folder = out / "samples" / p["label"].replace("(", "").replace(")", "").replace(" ", "-")
        t, c = time.perf_counter(), time.process_time()
        generate_samples(p["run"], a.prepared, folder, SampleSettings(n=a.n, sampler=p["sampler"], steps=p["steps"], guidance=1.0,
                                                                       seed=a.seed, quality_check=False),
                         device=a.device, batch_size=a.batch_size, overwrite=True)
        sync(a.device)
        timing[p["label"]] = {"seconds_per_volume": (time.perf_counter() - t) / a.n, "cpu_seconds_per_volume": (time.process_time() - c) / a.n}
        sets[p["label"]] = folder
        emit("sampling_quality_timing", label=p["label"], run=str(p["run"]), sampler=p["sampler"], steps=p["steps"], n=a.n,
             batch_size=a.batch_size, **{k: round(v, 3) for k, v in timing[p["label"]].items()}, peak_rss_gb=peak_rss_gb(),
             cuda_peak_gb=cuda_peak_gb(a.device), **ctx)
    kw = {"features": a.features} if a.features else {}
    metrics = evaluate(a.prepared, sets, out / "evaluation", n_pairs=a.pairs, seed=a.seed, device=a.device, overwrite=True,
                       segmenter=a.segmenter, n_boot=a.bootstrap, **kw)
    rows = quality_rows(plan, metrics, timing)
    settings = {"n": a.n, "features": metrics["settings"]["features"], "segmenter": a.segmenter, "batch_size": a.batch_size, **ctx}
    write_quality_tables(rows, metrics["real"], out, settings)
    plot_quality(rows, metrics["real"], out / "quality_vs_steps.png")
    (out / "quality_vs_steps.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1, default=str), encoding="utf-8")
    for r in rows:
        emit("sampling_quality_vs_steps", **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()},
             features=settings["features"], **ctx)
    return rows


def untrained_pipeline(preset: str, device: str):
    """The ``preset``'s VQ-GAN, Condition Extractor, denoiser and scheduler, randomly initialised, at the shape of
    its prepare preset (speed only); the trainers' own builders."""
    import torch

    from lad.data.prepare import load_prepare_config
    from lad.sampling.pipeline import LadPipeline
    from lad.schedulers import DDPMScheduler, RectifiedFlowScheduler
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import build_diffusion_models
    from lad.training.vqgan_trainer import build_vqgan

    cfg = resolve_train_config(preset, [])
    pc = load_prepare_config(preset)
    image = (int(pc.depth), *map(int, pc.size))
    latent = (cfg.vqgan.embedding_dim, *(s // f for s, f in zip(image, cfg.vqgan.downsample)))
    torch.manual_seed(0)
    vq = build_vqgan(cfg).eval()
    net = build_diffusion_models(cfg, latent, image[0]).eval()
    t = cfg.diffusion_train
    sched = (RectifiedFlowScheduler(num_train_timesteps=t.timesteps) if t.prediction == "rectified_flow" else
             DDPMScheduler(num_train_timesteps=t.timesteps, schedule=t.schedule, prediction_type=t.prediction, beta_max=t.beta_max))
    stats = {"shift": [0.0] * latent[0], "scale": [1.0] * latent[0], "latent_shape": list(latent), "image_shape": list(image)}
    cond = net["condition"].to(device) if "condition" in net else None
    return LadPipeline(vqgan=vq.to(device), denoiser=net["denoiser"].to(device), scheduler=sched, latent_stats=stats,
                       condition=cond, device=device)


def _box_masks(shape, batch: int):
    """(B, 1, D, H, W) uint8 masks: an organ box with a tumour box inside, the same for every sample."""
    import torch

    d, h, w = shape
    m = torch.zeros(batch, 1, d, h, w, dtype=torch.uint8)
    m[:, :, d // 4: 3 * d // 4, 2 * h // 5: 3 * h // 5, w // 3: 2 * w // 3] = 1
    m[:, :, 3 * d // 8: 5 * d // 8, 9 * h // 20: 11 * h // 20, 5 * w // 12: 7 * w // 12] = 2
    return m


def batch_point(run: str | None, preset: str, batch: int, sampler: str | None, steps: int, device: str, threads: int | None) -> dict:
    """Seconds per volume of one pipeline call of ``batch`` volumes (after an untimed warm-up call at that batch),
    in this (fresh) process: module-level for ``in_child``."""
    set_threads(threads)
    from lad.sampling.pipeline import LadPipeline
    from lad.schedulers import RECTIFIED_FLOW

    pipe = LadPipeline.from_run(run, device=device) if run else untrained_pipeline(preset, device)
    sampler = sampler or ("euler" if pipe.scheduler.config["prediction_type"] == RECTIFIED_FLOW else "ddim")
    masks = _box_masks(pipe.image_shape, batch)
    seeds = list(range(batch))
    pipe(masks, seeds=seeds, sampler=sampler, steps=2)
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    pipe(masks, seeds=seeds, sampler=sampler, steps=steps)
    sync(device)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"sampler": sampler, "image": "x".join(map(str, pipe.image_shape)), "latent": "x".join(map(str, pipe.latent_shape)),
            "seconds_per_volume": round(wall / batch, 4), "cpu_seconds_per_volume": round(cpu / batch, 4),
            "cuda_peak_gb": cuda_peak_gb(device)}


def batch_curve(a) -> list[dict]:
    """``--batch-curve``: seconds per volume and the peak RSS of a fresh process at each batch size."""
    rows = []
    for b in (int(v) for v in a.batches.split(",")):
        ctx = context(a.device)
        res, peak = in_child(batch_point, a.run, a.preset, b, a.sampler, a.steps, a.device, a.threads)
        row = {"batch": b, "steps": a.steps, "run": a.run or f"untrained {a.preset} preset", **res, "peak_rss_gb": peak}
        emit("sampling_batch_curve", **row, **ctx)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="trained run folder")
    ap.add_argument("--data", help="its prepared dataset (masks and the real set for the quality figures)")
    ap.add_argument("--n", type=int, default=8, help="volumes per sampler")
    ap.add_argument("--pairs", type=int, default=28, help="MS-SSIM pairs per set")
    ap.add_argument("--batch-size", type=int, default=1, help="volumes per pipeline call (lad sample --batch-size)")
    ap.add_argument("--no-quality", action="store_true", help="speed only (no evaluation of the two sets)")
    ap.add_argument("--out", default="/tmp/bench-sampling")
    ap.add_argument("--paper-untrained", action="store_true", help="speed at the paper's shape, untrained pipeline")
    ap.add_argument("--k", type=int, nargs=2, default=[2, 6], help="DDIM step counts timed in --paper-untrained")
    ap.add_argument("--full", action="store_true", help="--paper-untrained: run DDIM-50 and DDPM-300 end to end")
    ap.add_argument("--quality", metavar="RUN_EPS,RUN_RF", help="quality against steps: a DDPM-trained run and a rectified-flow run")
    ap.add_argument("--prepared", help="--quality: the prepared dataset (masks; held-out real windows)")
    ap.add_argument("--segmenter", default=None, help="--quality: organ segmenter folder (anatomy present, fidelity Dice)")
    ap.add_argument("--features", default=None, help="--quality: in-domain features folder (lad features train) for FID")
    ap.add_argument("--bootstrap", type=int, default=200, help="--quality: bootstrap replicates of the intervals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-curve", action="store_true", help="seconds per volume and peak RSS at batch sizes --batches")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--preset", default="demo", help="--batch-curve without --run: the untrained pipeline of this preset")
    ap.add_argument("--sampler", default=None, help="--batch-curve: sampler (default ddim; euler for a rectified-flow run)")
    ap.add_argument("--steps", type=int, default=50, help="--batch-curve: sampling steps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    set_threads(a.threads)
    if a.quality:
        if not a.prepared:
            ap.error("--quality needs --prepared")
        if a.out == "/tmp/bench-sampling":
            a.out = "/tmp/bench-sampling-quality"
        quality(a)
    elif a.batch_curve:
        batch_curve(a)
    elif a.paper_untrained:
        paper_untrained(a)
    elif a.run and a.data:
        trained(a)
    else:
        ap.error("give --run and --data, --paper-untrained, --quality RUN_EPS,RUN_RF --prepared P, or --batch-curve")


if __name__ == "__main__":
    main()
