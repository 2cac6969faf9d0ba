"""VQ-GAN training step (generator + discriminators), peak memory, host syncs, profile, variants.

The step is the trainer's (``lad.training.vqgan_trainer``): VQ-GAN forward, generator loss (L1,
commitment, Locality Loss, 2D + 3D hinge adversarial, feature matching; perceptual off unless
``--perceptual``), backward, gradient clipping, Adam; then both discriminators' hinge loss, backward,
clipping, Adam. The discriminators are on (``disc_start=0``), so every term is paid. The model is the
release's published configuration (the ``VQGAN()`` defaults = preset ``paper-abdomenct1k``): channels
16/32/64, compression 4x4x4, 16384 codes of dim 8, PatchGANs 64 ch x 3 layers, batch 2.

Issue #7 reference (the release on this machine kind, perceptual off, median of 2 steps):
1x16x64x64: 5.27 s, 2.0 GB peak (target <= 2.64 s); 1x32x256x256: 305 s, 19.4 GB (target <= 152 s, <= 8 GB).

Each figure runs in a fresh process (its own peak RSS). One JSON line per figure:

    .venv/bin/python benchmarks/bench_vqgan.py --threads 1                       # demo shape 1x16x64x64
    .venv/bin/python benchmarks/bench_vqgan.py --threads 1 --shape 32x256x256 --warmup 0 --repeats 2   # paper shape
    .venv/bin/python benchmarks/bench_vqgan.py --threads 1 --compare             # vs the straightforward implementation
    .venv/bin/python benchmarks/bench_vqgan.py --threads 1 --variants            # channels-last 3D, torch.compile, bf16
    .venv/bin/python benchmarks/bench_vqgan.py --threads 1 --profile --syncs     # top ops, host-sync op count
    .venv/bin/python benchmarks/bench_vqgan.py --device cuda --shape 32x256x256  # on a GPU

``--compare`` runs, in the same process and alternating, lad's step and the "simplest straightforward"
one: nearest codes from the full (N x K) distance matrix at once, and the Locality Loss with its
bounding box read back to the host per sample (the release's numpy crop, summed over the batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import context, count_sync_ops, cuda_peak_gb, emit, in_child, machine, profile_top, set_threads, time_steps  # noqa: E402

RELEASE = {"16x64x64": (5.27, 2.0), "32x256x256": (305.0, 19.4)}
VARIANTS = {"channels_last_3d": {"channels_last": True}, "torch_compile": {"compile_": True}, "bf16_autocast": {"precision": "bf16"}}


# ---- the simplest straightforward implementations (what lad's versions are measured against) ----

def naive_nearest_codes(flat, codebook):
    """Full (N x K) squared-distance matrix at once, then argmin (the release's quantiser)."""
    d = (flat**2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + (codebook**2).sum(1)[None]
    return d.argmin(1)


def naive_locality_loss(x, x_hat, mask, **_ignored):
    """Per-sample bounding box read back to the host, crop, L1; summed over the batch (the release)."""
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        idx = (mask[i, 0] > 0).nonzero()
        if idx.shape[0] == 0:
            continue
        lo, hi = idx.min(0).values, idx.max(0).values
        (z0, y0, x0), (z1, y1, x1) = [int(v) for v in lo], [int(v) + 1 for v in hi]
        total = total + (x[i, :, z0:z1, y0:y1, x0:x1] - x_hat[i, :, z0:z1, y0:y1, x0:x1]).abs().mean()
    return total


def use_naive(on: bool) -> None:
    import lad.models.quantizer as q
    import lad.training.losses as losses

    if not hasattr(q, "_lad_nearest_codes"):
        q._lad_nearest_codes, losses._lad_locality_loss = q.nearest_codes, losses.locality_loss
    q.nearest_codes = naive_nearest_codes if on else q._lad_nearest_codes
    losses.locality_loss = naive_locality_loss if on else losses._lad_locality_loss


# ---- the step ----

def build(shape, *, batch=2, device="cpu", perceptual=None, channels_last=False, compile_=False, precision="fp32",
          checkpointing=True, preset=None):
    """Model, losses, optimisers and a closure running one generator + discriminator step."""
    import contextlib

    import torch

    from lad.models.perceptual import PerceptualLoss
    from lad.models.vqgan import VQGAN
    from lad.training.losses import VQGANLoss

    torch.manual_seed(0)
    dev = torch.device(device)
    if preset:  # a training preset's VQ-GAN and discriminators (lad.training.vqgan_trainer.build_vqgan)
        from lad.training.config import resolve_train_config
        from lad.training.vqgan_trainer import build_vqgan

        cfg = resolve_train_config(preset, [])
        model = build_vqgan(cfg).to(dev)
        model.gradient_checkpointing = checkpointing
        t = cfg.vqgan_train
        crit = VQGANLoss(perceptual=PerceptualLoss(perceptual) if perceptual else None, disc_start=0,
                         disc_channels=t.disc_channels, disc_layers=t.disc_layers, disc_kernel=t.disc_kernel,
                         feature_matching=t.feature_matching).to(dev)
    else:
        model = VQGAN(gradient_checkpointing=checkpointing).to(dev)  # the release's configuration (the defaults)
        crit = VQGANLoss(perceptual=PerceptualLoss(perceptual) if perceptual else None, disc_start=0).to(dev)
    opt_g = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(crit.discriminator_parameters(), lr=3e-4, betas=(0.5, 0.9))
    x = torch.rand(batch, 1, *shape, device=dev)
    mask = torch.zeros(batch, 1, *shape, dtype=torch.uint8, device=dev)
    d, h, w = shape
    mask[:, :, d // 4 : d // 2, h // 3 : h // 2, w // 3 : w // 2] = 1
    mask[:, :, d // 3, h // 3 + 2 : h // 3 + 6, w // 3 + 2 : w // 3 + 6] = 2
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
        crit.disc3d.to(memory_format=torch.channels_last_3d)
        crit.disc2d.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    fwd = torch.compile(model) if compile_ else model
    gen = torch.Generator().manual_seed(0)

    def amp():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step():
        with amp():
            out = fwd(x)
            loss, _ = crit.generator_loss(x, out, mask, step=1, generator=gen)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_g.step()
        with amp():
            d_loss, _ = crit.discriminator_loss(x, out, step=1, generator=gen)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(crit.discriminator_parameters(), 1.0)
        opt_d.step()

    def losses_only():
        """Forward, both losses and their backward passes, no optimiser (Adam's CPU step counters are
        read with .item() by design: they live on the host even for CUDA parameters)."""
        with amp():
            out = fwd(x)
            loss, _ = crit.generator_loss(x, out, mask, step=1, generator=gen)
        loss.backward()
        with amp():
            d_loss, _ = crit.discriminator_loss(x, out, step=1, generator=gen)
        d_loss.backward()

    step.losses_only = losses_only
    return step


def measure(shape, opts, warmup, repeats, threads, extras):
    """Child process: time the step; optionally profile and count host-sync ops."""
    import torch

    set_threads(threads)
    if opts.get("device", "cpu").startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step = build(shape, **opts)
    step()  # first step: codebook data initialisation (+ compilation with --compile)
    first_s = time.perf_counter() - t0
    res = {"first_step_s_incl_build": round(first_s, 2), **time_steps(step, warmup=max(warmup - 1, 0), repeats=repeats,
                                                                        device=opts.get("device", "cpu"))}
    res["cuda_peak_gb"] = cuda_peak_gb(opts.get("device", "cpu"))
    if "syncs" in extras:
        res["sync_ops_forward_losses_backward"] = count_sync_ops(step.losses_only)
    if "profile" in extras:
        res["profile_top"] = profile_top(step, 12, opts.get("device", "cpu"))
    return res


def compare(shape, device, warmup, repeats, threads):
    """Child process: lad's step vs the straightforward one, alternating, same process and model."""
    set_threads(threads)
    out = {}
    steps = {}
    for name, naive in (("lad", False), ("straightforward", True)):
        use_naive(naive)
        steps[name] = build(shape, device=device)
        steps[name]()
        out[name] = {"sync_ops_forward_losses_backward": count_sync_ops(steps[name].losses_only)}
    times = {"lad": [], "straightforward": []}
    for _ in range(repeats):
        for name in times:
            use_naive(name == "straightforward")
            r = time_steps(steps[name], warmup=0, repeats=1, device=device)
            times[name].append(r["step_cpu_s_median"])
    use_naive(False)
    for name in times:
        out[name]["step_cpu_s_median"] = round(statistics.median(times[name]), 4)
    out["speedup_cpu"] = round(out["straightforward"]["step_cpu_s_median"] / out["lad"]["step_cpu_s_median"], 3)
    return out


def quantizer_only(shape, device, threads, naive):
    """Child process: nearest-code search alone at ``shape`` (batch 2): seconds and peak memory."""
    import torch

    set_threads(threads)
    import lad.models.quantizer as q

    c = 8
    n = 2 * (shape[0] // 4) * (shape[1] // 4) * (shape[2] // 4)
    flat, book = torch.randn(n, c, device=device), torch.randn(16384, c, device=device)
    fn = naive_nearest_codes if naive else q.nearest_codes
    r = time_steps(lambda: fn(flat, book), warmup=1, repeats=3, device=device)
    return {"vectors": n, "codes": 16384, **r}


def random_vgg_file(tmp: str) -> str:
    import torch

    from lad.models.perceptual import _vgg16_features

    path = os.path.join(tmp, "vgg16_random.pth")
    g = torch.Generator().manual_seed(0)
    state = {f"features.{k}": torch.randn(v.shape, generator=g) * 0.02 for k, v in _vgg16_features("meta").state_dict().items()}
    torch.save(state, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["16x64x64"], help="DxHxW, one or more (paper: 32x256x256)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--preset", default=None, help="a training preset's VQ-GAN, discriminators, window shape and batch "
                    "(paper-abdomenct1k, paper-totalsegmentator, demo, tiny) instead of the release's configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (the first initialises the codebook)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on the shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--perceptual", action="store_true", help="perceptual term on (random VGG16 file: same cost)")
    ap.add_argument("--no-checkpointing", action="store_true", help="no gradient checkpointing of the full-res decoder")
    ap.add_argument("--profile", action="store_true", help="top-12 ops by self time of one step")
    ap.add_argument("--syncs", action="store_true", help="count host-sync ops in one step")
    ap.add_argument("--compare", action="store_true", help="lad vs the straightforward step (same process)")
    ap.add_argument("--quantizer", action="store_true", help="nearest-code search alone: chunked vs full matrix")
    ap.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                    help="also these vs fp32 (no names: all of channels_last_3d torch_compile bf16_autocast)")
    ap.add_argument("--timeout", type=float, default=3600, help="per child process, seconds")
    a = ap.parse_args()
    set_threads(a.threads)
    if a.preset:
        import yaml

        from lad.config import PRESET_DIR
        from lad.training.config import resolve_train_config

        prep = yaml.safe_load((PRESET_DIR / f"prepare-{a.preset}.yaml").read_text())
        a.shape = ["x".join(map(str, (prep["depth"], *prep["size"])))]
        a.batch = resolve_train_config(a.preset, []).vqgan_train.batch_size
    extras = {k for k in ("profile", "syncs") if getattr(a, k)}
    with tempfile.TemporaryDirectory() as tmp:
        base = {"device": a.device, "batch": a.batch, "preset": a.preset, "perceptual": random_vgg_file(tmp) if a.perceptual else None,
                "checkpointing": not a.no_checkpointing}
        for s in a.shape:
            shape = tuple(int(v) for v in s.split("x"))
            ctx = context(a.device)
            rel = None if a.preset else RELEASE.get(s)
            if a.quantizer:
                for naive in (False, True):
                    try:
                        r, peak = in_child(quantizer_only, shape, a.device, a.threads, naive, timeout=a.timeout)
                        emit("vqgan_nearest_codes", shape=s, impl="full distance matrix" if naive else "lad chunked addmm",
                             peak_rss_gb=peak, **r, **ctx)
                    except RuntimeError as e:
                        emit("vqgan_nearest_codes", shape=s, impl="full distance matrix" if naive else "lad chunked addmm",
                             error=str(e).splitlines()[0], **ctx)
            if a.compare:
                r, peak = in_child(compare, shape, a.device, a.warmup, a.repeats, a.threads, timeout=a.timeout)
                emit("vqgan_step_vs_straightforward", shape=f"{a.batch}x1x{s}", peak_rss_gb=peak, **r, **ctx)
            variants = [("fp32", {})]
            if a.variants is not None:
                variants += [(v, VARIANTS[v]) for v in (a.variants or VARIANTS)]
            for name, kw in variants:
                reps = 1 if name == "bf16_autocast" else a.repeats
                warm = 0 if name == "bf16_autocast" else a.warmup
                try:
                    r, peak = in_child(measure, shape, {**base, **kw}, warm, reps, a.threads,
                                       extras if name == "fp32" else set(), timeout=a.timeout)
                except RuntimeError as e:
                    emit("vqgan_train_step", shape=f"{a.batch}x1x{s}", variant=name, error=str(e).splitlines()[0], **ctx)
                    continue
                emit("vqgan_train_step", shape=f"{a.batch}x1x{s}", variant=name, preset=a.preset, peak_rss_gb=peak,
                     perceptual=bool(a.perceptual), discriminators=True, checkpointing=not a.no_checkpointing,
                     release_s=rel[0] if rel else None, release_peak_gb=rel[1] if rel else None,
                     target_s=round(rel[0] / 2, 2) if rel else None, target_peak_gb=8.0 if s == "32x256x256" else None,
                     **r, **ctx, **machine())


if __name__ == "__main__":
    main()
