"""Denoiser training-step benchmark: forward + backward + Adam step at batch 2, with the condition.

One JSON line per figure (latent shape, parameters, step seconds = median of 3 after one warm-up
step, peak RSS of the figure's own process). Run by hand:

    .venv/bin/python benchmarks/bench_denoiser.py                       # default denoiser, both shapes
    .venv/bin/python benchmarks/bench_denoiser.py --channels 64 128 256 --res-blocks 2 --latent 8x4x16x16

Issue targets (half the release's time on this 2-core machine kind): latent 8x4x16x16 <= 1.75 s
(release pseudo-3D UNet, 41.3 M params: 3.49 s, 1.5 GB); latent 8x8x64x64 <= 9.7 s (release 19.4 s,
5.9 GB). The machine is shared: the JSON line records the 1-minute load average at the start and the
step's process CPU seconds (all threads), which contention does not inflate; with ``--threads 1`` the
CPU seconds are the step's single-core cost and half of them the ideal 2-core wall time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time

RELEASE_S = {"8x4x16x16": 3.49, "8x8x64x64": 19.4}
TARGET_S = {"8x4x16x16": 1.75, "8x8x64x64": 9.7}


def _step(latent, model_kwargs, cond_dim, repeats, threads):
    import torch

    from lad.models.denoiser import LatentDenoiser

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=cond_dim, **model_kwargs)
    opt = torch.optim.Adam(d.parameters(), 1e-4)
    z, t = torch.randn(2, *latent), torch.tensor([3, 200])
    c = torch.randn(2, cond_dim) if cond_dim else None
    times, cpu = [], []
    for i in range(repeats + 1):  # step 0 is the warm-up
        s, p = time.perf_counter(), time.process_time()
        loss = (d(z, t, c) - z).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - s)
            cpu.append(time.process_time() - p)
    return statistics.median(times), statistics.median(cpu), sum(p.numel() for p in d.parameters())


def _child(args, q):
    out = _step(*args)
    q.put((out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2))


def measure(latent, model_kwargs, cond_dim=704, repeats=3, threads=0):
    """Run one figure in a fresh spawned process; returns (wall seconds, CPU seconds, params, peak_rss_gb)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=((latent, model_kwargs, cond_dim, repeats, threads), q))
    p.start()
    (s, c, n), peak = q.get()
    p.join()
    return s, c, n, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", nargs="+", default=["8x4x16x16", "8x8x64x64"], help="CxDxHxW, one or more")
    ap.add_argument("--channels", type=int, nargs="+", default=None, help="default: LatentDenoiser's default")
    ap.add_argument("--attention", type=int, nargs="+", default=None, help="0/1 per level (default: the model's)")
    ap.add_argument("--res-blocks", type=int, default=None)
    ap.add_argument("--head-channels", type=int, default=None)
    ap.add_argument("--conditioning", default="embedding", choices=["embedding", "cross_attention"])
    ap.add_argument("--cond-dim", type=int, default=704, help="704 = the release's 512 content + 192 structure")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    kw: dict = {"conditioning": a.conditioning}
    if a.channels:
        kw["channels"] = tuple(a.channels)
        kw["attention_levels"] = tuple(bool(x) for x in a.attention) if a.attention else (False,) * (len(a.channels) - 1) + (True,)
    elif a.attention:
        kw["attention_levels"] = tuple(bool(x) for x in a.attention)
    if a.res_blocks is not None:
        kw["num_res_blocks"] = a.res_blocks
    if a.head_channels is not None:
        kw["num_head_channels"] = a.head_channels
    for lat in a.latent:
        shape = tuple(int(x) for x in lat.split("x"))
        kw["in_channels"] = kw["out_channels"] = shape[0]
        load = os.getloadavg()[0]
        s, c, n, peak = measure(shape, kw, a.cond_dim, a.repeats, a.threads)
        print(json.dumps({"figure": "denoiser_train_step", "latent": lat, "batch": 2, "cond_dim": a.cond_dim,
                          "model": {k: v for k, v in kw.items() if k not in ("in_channels", "out_channels")},
                          "params_m": round(n / 1e6, 2), "step_s_median": round(s, 3), "step_cpu_s_median": round(c, 3), "peak_rss_gb": round(peak, 2),
                          "target_s": TARGET_S.get(lat), "release_s": RELEASE_S.get(lat), "load_avg_1min": round(load, 2)}),
              flush=True)


if __name__ == "__main__":
    main()
