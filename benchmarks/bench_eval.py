"""Evaluation metrics: lad vs MONAI (FID, MS-SSIM) and the cost of MMD / PRDC / features.

Prints one JSON line per figure. Run: .venv/bin/python benchmarks/bench_eval.py [--quick] [--threads 1] [--device cuda]
    .venv/bin/python benchmarks/bench_eval.py --only throughput --threads 1   # features batched vs one by one, MS-SSIM pairs/s

``throughput`` (demo 1x16x64x64 and paper 1x32x256x256 volumes): feature extraction volumes/s with
lad's batched ``FeatureExtractor.extract`` (batch 4) against one volume per forward (the
straightforward loop), same process, same extractor; MS-SSIM pairs/s through ``pairwise_ms_ssim``
(4 pairs per batch) against one ``ms_ssim_3d`` call per pair; peak RSS of the process so far.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def emit(**kw):
    print(json.dumps(kw), flush=True)


def correlated_features(rng, n, dim, shift=0.0):
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return (rng.normal(size=(n, dim)) @ mix + shift).astype(np.float32)


def bench_fid(quick: bool):
    from monai.metrics import FIDMetric

    from lad.evaluation.realism import fid

    rng = np.random.default_rng(0)
    dim = 2048
    for n in ((300,) if quick else (500, 3000)):
        a, b = correlated_features(rng, n, dim), correlated_features(rng, n, dim, 0.05)
        t_lad, r = timed(lambda: fid(a, b), 3)
        emit(figure="fid", features=dim, n=n, impl="lad", method=r.details["method"], seconds=round(t_lad, 3), value=r.value)
        if n <= 500:
            t_monai, v = timed(lambda: float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b))), 1)
            emit(figure="fid", features=dim, n=n, impl="monai FIDMetric", seconds=round(t_monai, 3), value=v,
                 rel_diff=abs(v - r.value) / r.value, speedup=round(t_monai / t_lad, 1))


def bench_mmd_prdc(quick: bool):
    from lad.evaluation.realism import mmd, prdc

    rng = np.random.default_rng(1)
    n = 200 if quick else 800
    a, b = correlated_features(rng, n, 2048), correlated_features(rng, n, 2048, 0.05)
    t, r = timed(lambda: mmd(a, b), 3)
    emit(figure="mmd", features=2048, n=n, seconds=round(t, 3), value=r.value)
    t, r = timed(lambda: prdc(a, b), 3)
    emit(figure="prdc", features=2048, n=n, seconds=round(t, 3), **{k: r[k] for k in ("precision", "recall")})


def bench_ms_ssim(quick: bool):
    from monai.metrics import MultiScaleSSIMMetric
    from scipy import ndimage

    from lad.evaluation.diversity import ms_ssim_3d

    shape = (32, 128, 128) if quick else (32, 256, 256)
    rng = np.random.default_rng(2)
    a = ndimage.gaussian_filter(rng.random(shape), 2).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.02, shape), 0, 1).astype(np.float32)
    a, b = (a - a.min()) / (a.max() - a.min()), (b - b.min()) / (b.max() - b.min())
    t_lad, r = timed(lambda: ms_ssim_3d(a, b), 3)
    emit(figure="ms_ssim_pair", shape=shape, impl="lad (1,11,11) window, in-plane pooling", scales=r.details["scales"],
         seconds=round(t_lad, 3), value=r.value)
    weights = r.details["weights"] if r.details["scales"] < 5 else (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=(1, 11, 11), kernel_sigma=(1.0, 1.5, 1.5),
                                  weights=weights)
    ta, tb = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
    t_monai, v = timed(lambda: float(metric(ta, tb).mean()), 3)
    emit(figure="ms_ssim_pair", shape=shape, impl="monai MultiScaleSSIMMetric (1,11,11), 3D pooling", scales=len(weights),
         seconds=round(t_monai, 3), value=v, speedup=round(t_monai / t_lad, 1),
         note="values differ by design: MONAI also pools along z")


def bench_features(quick: bool):
    from lad.evaluation.features import FeatureExtractor

    shape = (1, 32, 128, 128) if quick else (1, 32, 256, 256)
    vols = [np.random.default_rng(i).random(shape).astype(np.float32) for i in range(4)]
    for spec in (("random-resnet10",) if quick else ("random-resnet10", "random-resnet50")):
        fx = FeatureExtractor.from_spec(spec)
        fx.extract(vols[:1])
        t, f = timed(lambda: fx.extract(vols, batch_size=2), 1)
        emit(figure="features", spec=spec, shape=shape, seconds_per_volume=round(t / len(vols), 3), dim=f.shape[1])


def bench_throughput(quick: bool, device: str = "cpu"):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import context, peak_rss_gb

    from lad.evaluation.diversity import ms_ssim_3d, pairwise_ms_ssim
    from lad.evaluation.features import FeatureExtractor

    fx = FeatureExtractor.from_spec("random-resnet10", device=device)
    shapes = [((1, 16, 64, 64), 8, 12)] + ([] if quick else [((1, 32, 256, 256), 4, 6)])
    for shape, n, n_vol_pairs in shapes:
        vols = [np.random.default_rng(i).random(shape).astype(np.float32) for i in range(n)]
        fx.extract(vols[:1], batch_size=1)  # warm-up
        ctx = context(device)
        t_one, c_one = time.perf_counter(), time.process_time()
        for v in vols:
            fx.extract([v], batch_size=1)
        t_one, c_one = time.perf_counter() - t_one, time.process_time() - c_one
        t_b, c_b = time.perf_counter(), time.process_time()
        fx.extract(vols, batch_size=4)
        t_b, c_b = time.perf_counter() - t_b, time.process_time() - c_b
        emit(figure="features_throughput", spec="random-resnet10", shape=shape, n=n, batch=4,
             volumes_per_s_batched=round(n / t_b, 3), volumes_per_s_one_by_one=round(n / t_one, 3),
             cpu_s_per_volume_batched=round(c_b / n, 3), cpu_s_per_volume_one_by_one=round(c_one / n, 3),
             speedup_cpu=round(c_one / c_b, 3), peak_rss_gb=peak_rss_gb(), **ctx)
        mv = [v[0] for v in vols[:4]]
        ctx = context(device)
        t, c = time.perf_counter(), time.process_time()
        r = pairwise_ms_ssim(mv, n_pairs=6, seed=0, device=device)
        t, c = time.perf_counter() - t, time.process_time() - c
        t1, c1 = time.perf_counter(), time.process_time()
        for i, j in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]:
            ms_ssim_3d(mv[i], mv[j], device=device)
        t1, c1 = time.perf_counter() - t1, time.process_time() - c1
        emit(figure="ms_ssim_throughput", shape=shape[1:], pairs=r.n_a,
             pairs_per_s_batched=round(6 / t, 3), pairs_per_s_one_by_one=round(6 / t1, 3),
             cpu_s_per_pair_batched=round(c / 6, 3), cpu_s_per_pair_one_by_one=round(c1 / 6, 3),
             scales=r.details.get("scales"), peak_rss_gb=peak_rss_gb(), **ctx)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--only", choices=["fid", "mmd", "ms_ssim", "features", "throughput"], default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="for --only throughput")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only == "throughput":
        bench_throughput(args.quick, args.device)
        return
    for name, fn in (("fid", bench_fid), ("mmd", bench_mmd_prdc), ("ms_ssim", bench_ms_ssim), ("features", bench_features)):
        if args.only in (None, name):
            fn(args.quick)


if __name__ == "__main__":
    main()
