"""VQ-GAN training step: time at 1x16x64x64 (batch 2), peak host memory at 1x32x256x256, profile.

The release's figure to beat is 5.27 s per generator + discriminator step at 1x16x64x64, batch 2
(target <= 0.5x, about 2.6 s), with its published configuration (n_hiddens 16 -> channels
16/32/64, compression 4x4x4, 16384 codes, embedding_dim 8, 2D + 3D PatchGAN 64 ch x 3 layers,
LPIPS on one axial slice). The discriminators are on (step >= disc_start), so every term is paid.
The perceptual term uses a random VGG16 written to a temporary file (same cost as real weights).

Prints one JSON line per figure. Run: .venv/bin/python benchmarks/bench_vqgan.py [--skip-memory] [--threads 1] [--profile]
On the shared 2-core machine under load, --threads 1 avoids OpenMP oversubscription (2 threads
were up to 47x slower on tiny ops and 3-4x slower here); compare cpu_s and wall on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from lad.models.perceptual import PerceptualLoss, _vgg16_features
from lad.models.vqgan import VQGAN
from lad.training.losses import VQGANLoss


def build(shape, perceptual_path):
    torch.manual_seed(0)
    model = VQGAN()  # the release's configuration (the defaults)
    perceptual = PerceptualLoss(perceptual_path) if perceptual_path else None
    crit = VQGANLoss(perceptual=perceptual, disc_start=0)
    opt_g = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(crit.discriminator_parameters(), lr=3e-4, betas=(0.5, 0.9))
    x = torch.rand(2, 1, *shape)
    mask = torch.zeros(2, 1, *shape, dtype=torch.uint8)
    d, h, w = shape
    mask[:, :, d // 4 : d // 2, h // 3 : h // 2, w // 3 : w // 2] = 1
    gen = torch.Generator().manual_seed(0)

    def step(i: int = 1):
        out = model(x)
        loss, _ = crit.generator_loss(x, out, mask, step=i, generator=gen)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_g.step()
        d_loss, _ = crit.discriminator_loss(x, out, step=i, generator=gen)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

    return step


def random_vgg_file(tmp: str) -> str:
    path = os.path.join(tmp, "vgg16_random.pth")
    g = torch.Generator().manual_seed(0)
    state = {f"features.{k}": torch.randn(v.shape, generator=g) * 0.02 for k, v in _vgg16_features("meta").state_dict().items()}
    torch.save(state, path)
    return path


def memory_child(perceptual_path: str) -> None:
    """One full step at the paper's shape; prints peak RSS (GiB) of this process."""
    step = build((32, 256, 256), perceptual_path)
    t = time.perf_counter()
    step()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(json.dumps({"figure": "peak_rss_gib_1x32x256x256_b2", "value": round(peak, 2), "limit": 8.0,
                      "step_s": round(dt, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        vgg = random_vgg_file(tmp)
        step = build((16, 64, 64), vgg)
        step()  # warm-up (data-initialises the codebook)
        ts, cpu = [], []
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            step()
            ts.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        print(json.dumps({"figure": "step_s_1x16x64x64_b2", "value": round(statistics.median(ts), 3),
                          "release_s": 5.27, "target_s": 2.635, "threads": torch.get_num_threads(),
                          "all_s": [round(t, 3) for t in ts], "cpu_s": round(statistics.median(cpu), 3),
                          "load_avg_1min": os.getloadavg()[0]}))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
            print(json.dumps({"figure": "profile_top10_self_cpu_ms",
                              "value": {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in rows}}))
        if not args.skip_memory:
            r = subprocess.run([sys.executable, __file__, "--memory-child", vgg], capture_output=True, text=True)
            sys.stdout.write(r.stdout)
            if r.returncode:
                sys.stderr.write(r.stderr)


if __name__ == "__main__":
    main()
