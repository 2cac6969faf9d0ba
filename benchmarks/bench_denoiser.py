"""Denoiser training-step benchmark: forward + backward + Adam step at batch 2, with the condition.

One JSON line per figure (latent shape, parameters, step seconds = median of 3 after one warm-up
step, peak RSS of the figure's own process). Run by hand:

    .venv/bin/python benchmarks/bench_denoiser.py                       # default denoiser, both shapes
    .venv/bin/python benchmarks/bench_denoiser.py --channels 64 128 256 --res-blocks 2 --latent 8x4x16x16

``--variants`` adds channels-last 3D, torch.compile and bf16 autocast (each in its own process);
``--profile`` the top operations of one step; ``--syncs`` the host-sync operations in forward + loss +
backward; ``--device cuda`` runs the same on a GPU (peak GPU memory in ``cuda_peak_gb``).

Issue targets (half the release's time on this 2-core machine kind): latent 8x4x16x16 <= 1.75 s
(release pseudo-3D UNet, 41.3 M params: 3.49 s, 1.5 GB); latent 8x8x64x64 <= 9.7 s (release 19.4 s,
5.9 GB). The machine is shared: the JSON line records the 1-minute load average at the start and the
step's process CPU seconds (all threads), which contention does not inflate; with ``--threads 1`` the
CPU seconds are the step's single-core cost and half of them the ideal 2-core wall time.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import context, count_sync_ops, cuda_peak_gb, emit, in_child, machine, profile_top, set_threads, time_steps  # noqa: E402

RELEASE_S = {"8x4x16x16": 3.49, "8x8x64x64": 19.4}
RELEASE_GB = {"8x4x16x16": 1.5, "8x8x64x64": 5.9}
TARGET_S = {"8x4x16x16": 1.75, "8x8x64x64": 9.7}
VARIANTS = ("channels_last_3d", "torch_compile", "bf16_autocast", "fused_adam")


def _measure(latent, model_kwargs, cond_dim, warmup, repeats, threads, device, variant, extras, batch=2):
    """Child process: the trainer's diffusion step (lad.models.guidance.diffusion_loss with the condition
    dropped to the null condition at p_uncond 0.25, L1, backward, clipping, Adam) at batch 2."""
    import contextlib

    import torch

    from lad.models.denoiser import LatentDenoiser
    from lad.models.guidance import diffusion_loss, drop_condition
    from lad.schedulers import DDPMScheduler

    set_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    d = LatentDenoiser(cond_dim=cond_dim, **model_kwargs).to(dev)
    null = torch.nn.Parameter(torch.zeros(cond_dim, device=dev)) if cond_dim else None
    params = list(d.parameters()) + ([null] if null is not None else [])
    fused = variant == "fused_adam"  # Adam(fused=True) + foreach gradient clipping: one kernel per step, not per tensor
    opt = torch.optim.Adam(params, 1e-4, fused=True) if fused else torch.optim.Adam(params, 1e-4)
    sched = DDPMScheduler(num_train_timesteps=300, schedule="cosine")
    z0 = torch.randn(batch, *latent, device=dev)
    c = torch.randn(batch, cond_dim, device=dev) if cond_dim else None
    if variant == "channels_last_3d":
        d.to(memory_format=torch.channels_last_3d)
        z0 = z0.contiguous(memory_format=torch.channels_last_3d)
    net = torch.compile(d) if variant == "torch_compile" else d
    gen = torch.Generator().manual_seed(0)

    def amp():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if variant == "bf16_autocast" else contextlib.nullcontext()

    def losses_only():
        with amp():
            cond = drop_condition(c, null, 0.25, gen) if c is not None else None
            loss, _ = diffusion_loss(net, sched, z0, cond, generator=gen, loss="l1")
        loss.backward()
        return loss

    def step():
        opt.zero_grad(set_to_none=True)
        losses_only()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True if fused else None)
        opt.step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    import time

    t0 = time.perf_counter()
    step()
    res = {"first_step_s": round(time.perf_counter() - t0, 2),
           **time_steps(step, warmup=max(warmup - 1, 0), repeats=repeats, device=device),
           "params_m": round(sum(p.numel() for p in d.parameters()) / 1e6, 2), "cuda_peak_gb": cuda_peak_gb(device)}
    if "syncs" in extras:
        res["sync_ops_forward_loss_backward"] = count_sync_ops(losses_only)
    if "profile" in extras:
        res["profile_top"] = profile_top(step, 12, device)
    return res


def preset_model(preset: str):
    """(denoiser kwargs, latent "CxDxHxW", cond_dim, diffusion batch size) of a training preset."""
    import yaml

    from lad.config import PRESET_DIR
    from lad.models.condition import ConditionExtractor
    from lad.training.config import resolve_train_config

    cfg = resolve_train_config(preset, [])
    prep = yaml.safe_load((PRESET_DIR / f"prepare-{preset}.yaml").read_text())
    shape = (int(prep["depth"]), *map(int, prep["size"]))
    lat = (cfg.vqgan.embedding_dim, *(s // f for s, f in zip(shape, cfg.vqgan.downsample)))
    c = cfg.condition
    cond = ConditionExtractor(latent_channels=lat[0], latent_shape=tuple(lat[1:]), num_slices=shape[0], use_content=c.use_content,
                              use_structure=c.use_structure, structure_dim=c.structure_dim).cond_dim if cfg.conditional else 0
    d = cfg.denoiser
    kw = {"channels": tuple(d.channels), "attention_levels": tuple(d.attention_levels), "num_res_blocks": d.num_res_blocks,
          "num_head_channels": d.num_head_channels, "norm_num_groups": d.norm_num_groups, "conditioning": d.conditioning}
    return kw, "x".join(map(str, lat)), cond, cfg.diffusion_train.batch_size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", nargs="+", default=["8x4x16x16", "8x8x64x64"], help="CxDxHxW, one or more")
    ap.add_argument("--channels", type=int, nargs="+", default=None, help="default: LatentDenoiser's default")
    ap.add_argument("--attention", type=int, nargs="+", default=None, help="0/1 per level (default: the model's)")
    ap.add_argument("--res-blocks", type=int, default=None)
    ap.add_argument("--head-channels", type=int, default=None)
    ap.add_argument("--groups", type=int, default=None, help="GroupNorm groups (norm_num_groups)")
    ap.add_argument("--conditioning", default="embedding", choices=["embedding", "cross_attention"])
    ap.add_argument("--cond-dim", type=int, default=704, help="704 = the release's 512 content + 192 structure")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--preset", default=None, help="the denoiser, condition size and latent of a training preset "
                    "(paper-abdomenct1k, paper-totalsegmentator, demo, tiny); batch stays --batch unless --preset-batch")
    ap.add_argument("--preset-batch", action="store_true", help="with --preset: the preset's diffusion batch size")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 on the shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                    help="also these (no names: all of channels_last_3d torch_compile bf16_autocast fused_adam)")
    ap.add_argument("--profile", action="store_true", help="top-12 ops by self time of one step")
    ap.add_argument("--syncs", action="store_true", help="count host-sync ops in forward + loss + backward")
    ap.add_argument("--timeout", type=float, default=3600, help="per child process, seconds")
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
    if a.groups is not None:
        kw["norm_num_groups"] = a.groups
    if a.preset:
        kw, lat, a.cond_dim, pb = preset_model(a.preset)
        a.latent = [lat]
        a.batch = pb if a.preset_batch else a.batch
    set_threads(a.threads)
    variants = ["fp32"] + ([] if a.variants is None else (a.variants or list(VARIANTS)))
    extras = {k for k in ("profile", "syncs") if getattr(a, k)}
    for lat in a.latent:
        shape = tuple(int(x) for x in lat.split("x"))
        kw["in_channels"] = kw["out_channels"] = shape[0]
        for v in variants:
            ctx = context(a.device)
            warm, reps = (0, 1) if v == "bf16_autocast" else (a.warmup, a.repeats)
            line = {"latent": lat, "batch": a.batch, "cond_dim": a.cond_dim, "variant": v, "preset": a.preset,
                    "model": {k: val for k, val in kw.items() if k not in ("in_channels", "out_channels")}}
            try:
                r, peak = in_child(_measure, shape, kw, a.cond_dim, warm, reps, a.threads, a.device, v,
                                   extras if v == "fp32" else set(), a.batch, timeout=a.timeout)
            except RuntimeError as e:
                emit("denoiser_train_step", **line, error=str(e).splitlines()[0], **ctx)
                continue
            ref = a.batch == 2 and not a.preset
            emit("denoiser_train_step", **line, peak_rss_gb=peak, target_s=TARGET_S.get(lat) if ref else None,
                 release_s=RELEASE_S.get(lat) if ref else None, release_peak_gb=RELEASE_GB.get(lat) if ref else None,
                 **r, **ctx, **machine())


if __name__ == "__main__":
    main()
