"""Training-step benchmark: seconds per VQ-GAN step and per diffusion step, and the data-loading share.

Runs the real trainers (``train_vqgan`` / ``train_diffusion``) for a few steps on a synthetic prepared
dataset written to a temporary folder, and reads the per-step figures they log
(``RUN/logs/<part>.jsonl``: ``step_time_s``, ``data_share``; the first step is warm-up and is dropped).
One JSON line per figure on stdout.

    .venv/bin/python benchmarks/bench_train.py                 # demo preset shapes (1x16x64x64, latent 8x4x16x16)
    .venv/bin/python benchmarks/bench_train.py --paper         # + paper shapes (1x32x256x256 batch 2; latent 8x8x64x64 batch 2)
    .venv/bin/python benchmarks/bench_train.py --device cuda --steps 5
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", action="store_true", help="also the paper's shapes (minutes per step on CPU, ~20 GB)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per part (after one warm-up step)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    bench("demo", (16, 64, 64), a.steps, a.device, [])
    if a.paper:
        bench("paper-abdomenct1k", (32, 256, 256), a.steps, a.device, ["diffusion_train.batch_size=2"])
