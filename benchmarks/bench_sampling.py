"""Sampling speed and the quality cost of DDIM: DDPM-300 vs DDIM-50.

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
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import context, cuda_peak_gb, emit, peak_rss_gb, set_threads, sync  # noqa: E402


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
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    set_threads(a.threads)
    if a.paper_untrained:
        paper_untrained(a)
    elif a.run and a.data:
        trained(a)
    else:
        ap.error("give --run and --data, or --paper-untrained")


if __name__ == "__main__":
    main()
