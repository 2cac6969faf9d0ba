"""What a compression allows: held-out MAE in the body of linear codes with as many numbers as a VQ-GAN latent.

For each held-out window of a prepared dataset: an average pool over ``f`` voxels per axis followed by
trilinear up-sampling (a linear code with one number per ``f`` cell), and a Gaussian blur of ``sigma``
voxels (an autoencoder that is sharp to within that blur). The MAE is taken in HU inside the body
(voxels above -500 HU), as ``RUN/vqgan_reconstruction.json`` takes it, so the numbers sit beside a
VQ-GAN's. An 8-channel latent at 4 x 4 x 4 down-sampling keeps 8 numbers per 64 voxels: as many as the
2 x 2 x 2 pool. Prints a Markdown table and one JSON line per row with the machine context.

Run: .venv/bin/python benchmarks/bench_reconstruction_floor.py --prepared DEMO/prepared
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from _common import context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True, help="prepared dataset (its test split is scored)")
    ap.add_argument("--pools", default="2x2x2,4x4x4,2x4x4", help="average-pool factors, comma-separated DxHxW")
    ap.add_argument("--sigmas", default="0.5,0.8", help="Gaussian blur sigmas in voxels, comma-separated")
    args = ap.parse_args()

    from lad.data.dataset import PreparedDataset
    from lad.data.labels import unit_to_hu

    ds = PreparedDataset(args.prepared, split="test")
    windows = [ds[i]["image"] for i in range(len(ds))]
    hus = [unit_to_hu(w[0]) for w in windows]
    rows = []
    for spec in args.pools.split(","):
        f = tuple(int(v) for v in spec.split("x"))
        maes = []
        for w, hu in zip(windows, hus):
            x = torch.from_numpy(np.asarray(w, np.float32))[None]
            y = F.interpolate(F.avg_pool3d(x, f), scale_factor=f, mode="trilinear", align_corners=False)
            maes.append(float(np.abs(unit_to_hu(y[0, 0].numpy()) - hu)[hu > -500].mean()))
        rows.append((f"average pool {spec} + trilinear up-sampling", float(np.mean(maes))))
    for sigma in (float(v) for v in args.sigmas.split(",")):
        maes = [float(np.abs(ndimage.gaussian_filter(hu, sigma) - hu)[hu > -500].mean()) for hu in hus]
        rows.append((f"Gaussian blur, sigma {sigma:g} voxel", float(np.mean(maes))))
    print(f"| code ({len(windows)} held-out windows of {args.prepared}) | MAE in the body (HU) |\n|---|---|")
    for name, mae in rows:
        print(f"| {name} | {mae:.1f} |")
    for name, mae in rows:
        print(json.dumps({"bench": "reconstruction_floor", "code": name, "mae_body_hu": round(mae, 2), **context()}))


if __name__ == "__main__":
    main()
