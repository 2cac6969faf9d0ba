"""Training-step benchmark: seconds per VQ-GAN step and per diffusion step, and the data-loading share.

Runs the real trainers (``train_vqgan`` / ``train_diffusion``) for a few steps on a synthetic prepared
dataset written to a temporary folder, and reads the per-step figures they log
(``RUN/logs/<part>.jsonl``: ``step_time_s``, ``data_share``; the first step is warm-up and is dropped).
One JSON line per figure on stdout.

    .venv/bin/python benchmarks/bench_train.py                 # demo preset shapes (1x16x64x64, latent 8x4x16x16)
    .venv/bin/python benchmarks/bench_train.py --paper         # + paper shapes (1x32x256x256 batch 2; latent 8x8x64x64 batch 2)
    .venv/bin/python benchmarks/bench_train.py --device cuda --steps 5
    .venv/bin/python benchmarks/bench_train.py --loading 16x64x64 32x256x256 --threads 1   # loading vs straightforward

``--loading`` compares, in one process and at batch 2, what a training step spends on its data with
lad's loading against the simplest straightforward loading, as a share of the step itself:
VQ-GAN: memory-mapped prepared windows (``PreparedDataset`` + ``gather_batch``, the trainer's path)
vs reading each patient's arrays from disk every step (``np.load`` without ``mmap_mode``); diffusion:
the cached latents (the trainer's ``latent_cache``, indexed in memory) vs encoding the batch every step
(VQ-GAN encoder on image and mask + Betti vectors), against the default denoiser's step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _figures(run: Path, part: str) -> dict:
    rows = [json.loads(line) for line in (run / "logs" / f"{part}.jsonl").read_text().splitlines()][1:]  # drop warm-up
    return {"seconds_per_step": round(statistics.median(r["step_time_s"] for r in rows), 3),
            "data_share": round(statistics.median(r["data_share"] for r in rows), 4), "steps_timed": len(rows)}


def bench(preset: str, shape: tuple[int, int, int], steps: int, device: str, extra: list[str]) -> None:
    import torch

    from conftest import write_prepared
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion
    from lad.training.vqgan_trainer import train_vqgan

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_prepared(tmp / "prepared", patients=2, windows=2, shape=shape)
        cfg = resolve_train_config(preset, [f"vqgan_train.steps={steps + 1}", f"diffusion_train.steps={steps + 1}",
                                            "logging.log_every=1", "logging.image_every=0", "logging.checkpoint_every=100000",
                                            "vqgan_train.disc_start=0", *extra])
        run = tmp / "run"
        train_vqgan(data, run, cfg, device=device, progress_bar=False)
        v = _figures(run, "vqgan")
        print(json.dumps({"figure": "vqgan_train_step", "preset": preset, "shape": f"1x{'x'.join(map(str, shape))}",
                          "batch": cfg.vqgan_train.batch_size, "discriminators": True, "perceptual": False, "device": device,
                          "threads": torch.get_num_threads(), **v}), flush=True)
        t0 = time.perf_counter()
        train_diffusion(data, run, cfg, device=device, progress_bar=False)
        d = _figures(run, "diffusion")
        latent = json.loads((run / "latent_stats.json").read_text())["latent_shape"]
        print(json.dumps({"figure": "diffusion_train_step", "preset": preset, "latent": "x".join(map(str, latent)),
                          "batch": cfg.diffusion_train.batch_size, "variant": cfg.variant, "device": device,
                          "threads": torch.get_num_threads(), "part_total_s_incl_latent_cache": round(time.perf_counter() - t0, 2),
                          **d}), flush=True)


def loading(shape: tuple[int, int, int], threads: int | None, repeats: int, step_cpu_s: list[float] | None = None) -> dict:
    """Child process: data time per step (lad vs straightforward) and the step times they are shares of."""
    import numpy as np
    import torch

    from _common import set_threads, time_steps
    from bench_vqgan import build
    from conftest import write_prepared
    from lad.data.dataset import PreparedDataset
    from lad.data.labels import hu_to_unit
    from lad.models.condition import encode_mask
    from lad.models.denoiser import LatentDenoiser
    from lad.models.guidance import diffusion_loss
    from lad.models.vqgan import VQGAN
    from lad.schedulers import DDPMScheduler
    from lad.topology import betti_vectors
    from lad.training.common import batch_indices, gather_batch

    set_threads(threads)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_prepared(Path(tmp) / "prepared", patients=3, windows=4, shape=shape)
        ds = PreparedDataset(data, split="train", organ_labels=False)
        dev = torch.device("cpu")
        batches = [batch_indices(s, 2, len(ds), 0) for s in range(repeats + 1)]

        def lad_load(i=[0]):
            i[0] += 1
            return gather_batch(ds, batches[i[0] % len(batches)], dev)

        def plain_load(i=[0]):  # read the patient's whole arrays from disk on every step
            i[0] += 1
            imgs, masks = [], []
            for k in batches[i[0] % len(batches)]:
                w = ds.windows[int(k)]
                folder = data / "patients" / w["patient"]
                imgs.append(hu_to_unit(np.load(folder / "image.npy")[w["index"]])[None])
                masks.append(np.load(folder / "mask.npy")[w["index"]][None])
            return {"image": torch.from_numpy(np.stack(imgs)), "mask": torch.from_numpy(np.stack(masks))}

        lad_t = time_steps(lad_load, warmup=1, repeats=repeats)["step_cpu_s_median"]
        plain_t = time_steps(plain_load, warmup=1, repeats=repeats)["step_cpu_s_median"]
        if step_cpu_s:  # measured by bench_vqgan.py / bench_denoiser.py (paper shapes: minutes per step)
            vq_step = step_cpu_s[0]
        else:
            step = build(shape)
            step()
            vq_step = time_steps(step, warmup=0, repeats=1)["step_cpu_s_median"]
            del step
        out["vqgan"] = {"step_cpu_s": vq_step, "data_cpu_s_lad_mmap": lad_t, "data_cpu_s_read_per_step": plain_t,
                        "share_lad": round(lad_t / (vq_step + lad_t), 5), "share_straightforward": round(plain_t / (vq_step + plain_t), 5),
                        "step_from": "given (--step-cpu-s)" if step_cpu_s else "measured here"}

        torch.manual_seed(0)
        vq = VQGAN().eval().requires_grad_(False)
        lat = vq.latent_shape(shape)
        n = len(ds)
        cache = {"z": torch.randn(n, *lat), "mask_z": torch.randn(n, *lat), "betti": torch.randint(0, 5, (n, shape[0] * 6))}

        def lad_latents(i=[0]):
            i[0] += 1
            idx = torch.from_numpy(batches[i[0] % len(batches)])
            return {k: v[idx] for k, v in cache.items()}

        def encode_per_step(i=[0]):
            i[0] += 1
            b = gather_batch(ds, batches[i[0] % len(batches)], dev)
            with torch.no_grad():
                return {"z": vq.encode(b["image"]), "mask_z": encode_mask(vq, b["mask"]),
                        "betti": torch.from_numpy(betti_vectors(b["mask"][:, 0].numpy()))}

        lat_t = time_steps(lad_latents, warmup=1, repeats=repeats)["step_cpu_s_median"]
        enc_t = time_steps(encode_per_step, warmup=1, repeats=repeats)["step_cpu_s_median"]
        den = LatentDenoiser(cond_dim=704, in_channels=lat[0], out_channels=lat[0])
        opt = torch.optim.Adam(den.parameters(), 1e-4)
        sched = DDPMScheduler(num_train_timesteps=300)
        z0, c, g = torch.randn(2, *lat), torch.randn(2, 704), torch.Generator().manual_seed(0)

        def dstep():
            opt.zero_grad()
            diffusion_loss(den, sched, z0, c, generator=g)[0].backward()
            opt.step()

        if step_cpu_s:
            d_step = step_cpu_s[1]
        else:
            dstep()
            d_step = time_steps(dstep, warmup=0, repeats=1)["step_cpu_s_median"]
        out["diffusion"] = {"latent": "x".join(map(str, lat)), "step_cpu_s": d_step, "data_cpu_s_lad_cached_latents": lat_t,
                            "data_cpu_s_encode_per_step": enc_t, "share_lad": round(lat_t / (d_step + lat_t), 5),
                            "share_straightforward": round(enc_t / (d_step + enc_t), 5),
                            "step_from": "given (--step-cpu-s)" if step_cpu_s else "measured here"}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", action="store_true", help="also the paper's shapes (minutes per step on CPU, ~20 GB)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per part (after one warm-up step)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loading", nargs="+", default=None, metavar="DxHxW",
                    help="only the data-loading comparison at these image shapes (CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--step-cpu-s", type=float, nargs=2, default=None, metavar=("VQGAN", "DENOISER"),
                    help="with --loading: step CPU seconds measured by bench_vqgan/bench_denoiser instead of measuring them")
    a = ap.parse_args()
    if a.loading:
        from _common import context, emit, in_child, set_threads

        set_threads(a.threads)
        for s in a.loading:
            shape = tuple(int(v) for v in s.split("x"))
            ctx = context("cpu")
            r, peak = in_child(loading, shape, a.threads, a.steps, a.step_cpu_s)
            for part, v in r.items():
                emit(f"data_loading_share_{part}", image_shape=f"2x1x{s}", batch=2, target_share=0.05,
                     met=v["share_lad"] < 0.05, peak_rss_gb=peak, **v, **ctx)
        sys.exit(0)
    bench("demo", (16, 64, 64), a.steps, a.device, [])
    if a.paper:
        bench("paper-abdomenct1k", (32, 256, 256), a.steps, a.device, ["diffusion_train.batch_size=2"])
