"""Training-step and sampling benchmarks. One JSON line per figure; each figure runs in its own process
(so its peak RSS is its own). Run by hand:

    .venv/bin/python benchmarks/bench_train.py            # demo shapes (minutes)
    .venv/bin/python benchmarks/bench_train.py --paper    # + the paper's shapes (slow on CPU, ~8 GB)

Reference figures of the paper's public release on this machine kind (issue tracker): VQ-GAN G+D step
1x16x64x64 batch 2: 5.27 s / 2.0 GB; 1x32x256x256: 305 s / 19.4 GB; pseudo-3D UNet denoiser step
(41.3 M params, 704-d condition) latent 8x4x16x16: 3.49 s / 1.5 GB; latent 8x8x64x64: 19.4 s / 5.9 GB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

RELEASE = {"vqgan_1x16x64x64": 5.27, "vqgan_1x32x256x256": 305.0, "denoiser_8x4x16x16": 3.49, "denoiser_8x8x64x64": 19.4}


def _vqgan_step(shape, steps):
    import torch

    from lad.models.vqgan import VQGAN
    from lad.training.losses import VQGANLoss

    torch.manual_seed(0)
    m = VQGAN(channels=(16, 32, 64), num_embeddings=16384, embedding_dim=8)  # the release's published configuration
    crit = VQGANLoss(disc_start=0, disc_channels=64, disc_layers=3)  # perceptual off, discriminators on
    og, od = torch.optim.Adam(m.parameters(), 3e-4), torch.optim.Adam(crit.discriminator_parameters(), 3e-4)
    x = torch.rand(2, 1, *shape)
    mask = torch.zeros(2, 1, *shape, dtype=torch.uint8)
    mask[:, :, shape[0] // 4 : shape[0] // 2, shape[1] // 3 : shape[1] // 2, shape[2] // 3 : shape[2] // 2] = 1
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        out = m(x)
        loss, _ = crit.generator_loss(x, out, mask, 1)
        og.zero_grad()
        loss.backward()
        og.step()
        d, _ = crit.discriminator_loss(x, out, 1)
        od.zero_grad()
        d.backward()
        od.step()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _denoiser_step(latent, steps, channels=(64, 128, 256), cond_dim=704):
    import torch

    from lad.models.denoiser import LatentDenoiser

    torch.manual_seed(0)
    d = LatentDenoiser(channels=channels, attention_levels=(False,) * (len(channels) - 1) + (True,), cond_dim=cond_dim)
    opt = torch.optim.Adam(d.parameters(), 1e-4)
    z, c, t = torch.randn(2, *latent), torch.randn(2, cond_dim), torch.tensor([3, 200])
    times = []
    for i in range(steps + 1):
        s = time.perf_counter()
        loss = (d(z, t, c) - z).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - s)
    return statistics.median(times), sum(p.numel() for p in d.parameters())


def _sampling(sampler, steps):
    import torch

    from lad.models.denoiser import LatentDenoiser
    from lad.models.guidance import guided_epsilon
    from lad.schedulers import DDIMScheduler, DDPMScheduler

    torch.manual_seed(0)
    d = LatentDenoiser(channels=(32, 64), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16, cond_dim=112).eval()
    sch = (DDIMScheduler if sampler == "ddim" else DDPMScheduler)(num_train_timesteps=300)
    sch.set_timesteps(steps)
    z, c, null = torch.randn(1, 8, 4, 16, 16), torch.randn(1, 112), torch.zeros(112)
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in sch.timesteps:
            z = sch.step(guided_epsilon(d, z, torch.tensor([int(t)]), c, null, 1.0), t, z, generator=[torch.Generator().manual_seed(0)])
    return time.perf_counter() - t0


def _child(name, fn, args, q):
    out = fn(*args)
    q.put((out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2))


def run(name, fn, *args):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_child, args=(name, fn, args, q))
    p.start()
    out, peak = q.get()
    p.join()
    return out, round(peak, 2)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--paper", action="store_true")
    a = ap.parse_args()
    s, peak = run("vqgan", _vqgan_step, (16, 64, 64), 2)
    print(json.dumps({"figure": "vqgan_g+d_step", "shape": "1x16x64x64", "batch": 2, "seconds": round(s, 3), "peak_rss_gb": peak,
                      "release_s": RELEASE["vqgan_1x16x64x64"], "ratio_vs_release": round(s / RELEASE["vqgan_1x16x64x64"], 3)}))
    (s, n), peak = run("den", _denoiser_step, (8, 4, 16, 16), 3)
    print(json.dumps({"figure": "denoiser_step", "latent": "8x4x16x16", "batch": 2, "params_m": round(n / 1e6, 1), "seconds": round(s, 3),
                      "peak_rss_gb": peak, "release_s": RELEASE["denoiser_8x4x16x16"], "ratio_vs_release": round(s / RELEASE["denoiser_8x4x16x16"], 3)}))
    ddpm, _ = run("ddpm", _sampling, "ddpm", 300)
    ddim, _ = run("ddim", _sampling, "ddim", 50)
    print(json.dumps({"figure": "sampling_latent_loop", "latent": "8x4x16x16", "model": "demo denoiser", "ddpm300_s": round(ddpm, 2),
                      "ddim50_s": round(ddim, 2), "speedup": round(ddpm / ddim, 2)}))
    if a.paper:
        (s, n), peak = run("den", _denoiser_step, (8, 8, 64, 64), 1)
        print(json.dumps({"figure": "denoiser_step", "latent": "8x8x64x64", "batch": 2, "seconds": round(s, 2), "peak_rss_gb": peak,
                          "release_s": RELEASE["denoiser_8x8x64x64"], "ratio_vs_release": round(s / RELEASE["denoiser_8x8x64x64"], 3)}))
        s, peak = run("vqgan", _vqgan_step, (32, 256, 256), 1)
        print(json.dumps({"figure": "vqgan_g+d_step", "shape": "1x32x256x256", "batch": 2, "seconds": round(s, 1), "peak_rss_gb": peak,
                          "release_s": RELEASE["vqgan_1x32x256x256"], "ratio_vs_release": round(s / RELEASE["vqgan_1x32x256x256"], 3)}))
