"""Sampling speed and the quality cost of DDIM: DDPM-300 vs DDIM-50 on a trained run.

    .venv/bin/python benchmarks/bench_sampling.py --run RUN --data PREPARED [--n 8] [--out /tmp/bench-sampling]

Prints one JSON line per figure: seconds per volume (whole pipeline: conditions, guided denoising
loop, decoding) and peak RSS for each sampler, then FID / MMD / MS-SSIM of each sample set against
the held-out real windows (lad evaluate, same extractor), so the DDIM speed-up comes with its price.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from lad.evaluation.evaluate import evaluate
from lad.sampling.generate import SampleSettings, generate_samples

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--out", default="/tmp/bench-sampling")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    sets = {}
    for sampler, steps in (("ddim", 50), ("ddpm", 300)):
        folder = out / f"{sampler}{steps}"
        t = time.perf_counter()
        s = generate_samples(a.run, a.data, folder, SampleSettings(n=a.n, sampler=sampler, steps=steps, quality_check=False))
        secs = (time.perf_counter() - t) / a.n
        sets[f"{sampler.upper()}-{steps}"] = folder
        print(json.dumps({"figure": "sampling", "sampler": sampler, "steps": steps, "n": a.n, "seconds_per_volume": round(secs, 2),
                          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)}))
    res = evaluate(a.data, sets, out / "evaluation", n_pairs=28)
    for name, e in res["sets"].items():
        print(json.dumps({"figure": "sampler_quality", "set": name, "n": e["n"], "fid": round(e["fid"], 4), "mmd": round(e["mmd"], 4),
                          "fid_localized": round(e["fid_localized"], 4), "ms_ssim": round(e["ms_ssim"], 4),
                          "real_ms_ssim": round(res["real"]["ms_ssim"], 4), "features": res["settings"]["features"]}))
