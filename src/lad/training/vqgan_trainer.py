"""``lad train vqgan``: the VQ-GAN with the Locality Loss (paper section 3.2, eq. 1-3)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lad.config import save_config
from lad.training.common import (CheckpointManager, Logger, NonFiniteGuard, autocast, batch_indices, check_run_part,
                                 gather_batch, resolve_device, seed_step, slice_grid, step_generator)
from lad.training.config import TrainConfig
from lad.utils.log import get_logger, is_main_process, progress

__all__ = ["train_vqgan", "build_vqgan"]

log = get_logger(__name__)


def build_vqgan(cfg: TrainConfig):
    from lad.models.vqgan import VQGAN

    m = cfg.vqgan
    return VQGAN(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(m.channels), num_res_blocks=m.num_res_blocks,
                 downsample=tuple(m.downsample), embedding_dim=m.embedding_dim, num_embeddings=m.num_embeddings,
                 commitment_cost=m.commitment_cost, decay=m.decay, norm_num_groups=m.norm_num_groups,
                 dead_code_threshold=m.dead_code_threshold)


def _open_dataset(data: str | Path, cfg: TrainConfig):
    from lad.data.dataset import PreparedDataset

    ds = PreparedDataset(data, split="train")
    if len(ds) == 0:
        raise ValueError(f"{data}: the training split has no windows")
    bad = [s for s, f in zip(ds.shape, cfg.vqgan.downsample) if s % f]
    if bad:
        raise ValueError(f"{data}: window shape {ds.shape} is not divisible by the VQ-GAN compression {tuple(cfg.vqgan.downsample)}")
    return ds


def train_vqgan(data: str | Path, run: str | Path, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                device: str = "cpu", perceptual_weights: str | None = None, stop_after: int | None = None) -> Path:
    """Train (or resume) the VQ-GAN of ``run`` on the prepared dataset ``data``; returns ``RUN/vqgan``.

    ``stop_after`` ends this call after that many steps, as a killed job would (tests of resume).
    """
    from lad.models.perceptual import PerceptualLoss
    from lad.training.losses import VQGANLoss

    run = Path(run)
    dev = resolve_device(device)
    ds = _open_dataset(data, cfg)
    check_run_part(run, ["vqgan", "checkpoints/vqgan", "latent_cache", "latent_stats.json"], resume=resume, overwrite=overwrite)
    run.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_config(cfg, run / "config.yaml")
    t = cfg.vqgan_train
    torch.manual_seed(cfg.seed)
    model = build_vqgan(cfg).to(dev)
    crit = VQGANLoss(l1_weight=t.l1_weight, perceptual_weight=t.perceptual_weight, perceptual=PerceptualLoss.maybe(perceptual_weights),
                     disc2d_weight=t.disc2d_weight, disc3d_weight=t.disc3d_weight, feature_matching_weight=t.feature_matching_weight,
                     locality_weight=t.locality_weight, disc_start=t.disc_start, disc_channels=t.disc_channels,
                     disc_layers=t.disc_layers).to(dev)
    opt_g = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas))
    opt_d = torch.optim.Adam(crit.discriminator_parameters(), lr=t.lr, betas=tuple(t.betas))
    ckpt = CheckpointManager(run / "checkpoints" / "vqgan", cfg.logging.keep_last)
    start = 0
    if resume:
        state = ckpt.load_latest({"vqgan": model, "loss": crit}, {"opt_g": opt_g, "opt_d": opt_d}, dev)
        start = state["step"] if state else 0
    logger = Logger(run / "tensorboard" / "vqgan", jsonl=run / "logs" / "vqgan.jsonl")
    guard = NonFiniteGuard(cfg.logging.max_nonfinite_steps)
    model.train()
    crit.train()
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    bar = progress(range(start, end), total=end - start, desc="vqgan", unit="step")
    t_last, n_last = time.perf_counter(), start
    for step in bar:
        seed_step(cfg.seed, step, "vqgan")
        gen = step_generator(cfg.seed, step, "vqgan")
        batch = gather_batch(ds, batch_indices(step, t.batch_size, len(ds), cfg.seed), dev)
        x, mask = batch["image"], batch["mask"]
        with autocast(dev, cfg.precision):
            out = model(x)
            g_loss, logs = crit.generator_loss(x, out, mask, step, gen)
        if guard.ok(g_loss, step):
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt_g.step()
            if step >= t.disc_start:
                with autocast(dev, cfg.precision):
                    d_loss, dlogs = crit.discriminator_loss(x, out, step, gen)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                torch.nn.utils.clip_grad_norm_(crit.discriminator_parameters(), t.grad_clip)
                opt_d.step()
                logs.update(dlogs)
            logs.update(perplexity=out.perplexity.detach(), codebook_usage=out.usage.detach())
            logger.accumulate(logs)
        done = step + 1
        if done % cfg.logging.log_every == 0 or done == end:
            now = time.perf_counter()
            rate = (done - n_last) / max(now - t_last, 1e-9)
            means = logger.flush(done, "vqgan", {"lr": opt_g.param_groups[0]["lr"], "steps_per_s": rate,
                                                 "samples_per_s": rate * t.batch_size, "step_time_s": 1 / max(rate, 1e-9),
                                                 "skipped_steps": guard.skipped})
            t_last, n_last = now, done
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{means.get('total', float('nan')):.4f}", ppl=f"{means.get('perplexity', 0):.0f}")
        if cfg.logging.image_every and done % cfg.logging.image_every == 0:
            logger.image("vqgan/input_vs_recon", slice_grid([x[0], out.recon[0]]), done)
        if done % cfg.logging.checkpoint_every == 0 or done == t.steps:
            if is_main_process():
                ckpt.save(done, {"vqgan": model, "loss": crit}, {"opt_g": opt_g, "opt_d": opt_d})
    logger.close()
    if end == t.steps and is_main_process():
        model.eval().save_pretrained(run / "vqgan", extra={"trained_steps": t.steps, "variant": cfg.variant})
        log.info("VQ-GAN saved to %s", run / "vqgan")
    return run / "vqgan"
