"""``lad train vqgan``: the VQ-GAN with the Locality Loss (paper section 3.2, eq. 1-3).

One step: generator (VQ-GAN) loss = L1 + commitment (+ perceptual) (+ Locality Loss) (+ 2D/3D
adversarial and feature matching from ``disc_start``), then the discriminators' hinge loss on the
detached reconstruction. Every random draw of step ``s`` comes from seeds derived from ``(seed, s)``
and the batch from the per-epoch permutation of ``(seed, epoch)``, so ``resume=True`` continues
bit-for-bit (CPU) from the last checkpoint in ``RUN/checkpoints/vqgan/``.

Under ``torchrun`` (``lad.training.parallel``): the VQ-GAN and the discriminators are wrapped in
DistributedDataParallel, ``batch_size`` is the global batch (rank ``r`` takes its samples ``r::world``),
the discriminators' BatchNorm uses the global batch's statistics, the codebook's EMA statistics and
restarts are global (``lad.models.quantizer``); rank 0 alone writes logs, checkpoints and weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lad.config import save_config
from lad.training.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from lad.training.common import (Logger, NonFiniteGuard, autocast, batch_indices, check_resume_config, check_run_part, data_state,
                                 gather_batch, make_grad_scaler, resolve_device, seed_step, slice_grid, step_generator,
                                 load_latest_checkpoint, save_checkpoint, validate_dataset)
from lad.training.common import check_downstream, remove_downstream
from lad.training.config import TrainConfig
from lad.training.parallel import check_global_batch, shard_batch, sync_batchnorm, wrap_ddp
from lad.utils.distributed import get_rank, get_world_size, init_distributed
from lad.utils.log import get_logger, is_main_process, progress

__all__ = ["train_vqgan", "build_vqgan", "VQGAN_OUTPUTS"]

log = get_logger(__name__)

# What a VQ-GAN (re)training owns in the run folder; the latent cache and stats depend on its weights.
VQGAN_OUTPUTS = ["vqgan", "checkpoints/vqgan", "tensorboard/vqgan", "logs/vqgan.jsonl", "latent_cache", "latent_stats.json",
                 "vqgan_reconstruction.json"]


def build_vqgan(cfg: TrainConfig):
    """The (untrained) VQ-GAN of ``cfg.vqgan``: images (B, 1, D, H, W) in [0, 1]."""
    from lad.models.vqgan import VQGAN

    m = cfg.vqgan
    return VQGAN(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(m.channels), num_res_blocks=m.num_res_blocks,
                 downsample=tuple(m.downsample), embedding_dim=m.embedding_dim, num_embeddings=m.num_embeddings,
                 commitment_cost=m.commitment_cost, decay=m.decay, norm_num_groups=m.norm_num_groups,
                 dead_code_threshold=m.dead_code_threshold, architecture=m.architecture)


def lr_at(step: int, t) -> float:
    """Learning rate of step ``step`` (0-based) under ``t.lr_schedule``: constant, or a linear warm-up over
    ``t.lr_warmup`` steps followed by a cosine decay from ``t.lr`` to 0 at step ``t.steps``."""
    if t.lr_schedule == "constant":
        return t.lr
    if step < t.lr_warmup:
        return t.lr * (step + 1) / t.lr_warmup
    span = max(t.steps - t.lr_warmup, 1)
    return t.lr * 0.5 * (1 + math.cos(math.pi * min(step - t.lr_warmup, span) / span))


def open_training_data(data: str | Path, cfg: TrainConfig, *, progress_bar: bool = True):
    """The training split of prepared dataset ``data``, validated (shapes, labels, compression)."""
    from lad.data.dataset import PreparedDataset

    ds = PreparedDataset(data, split="train")
    validate_dataset(ds, tuple(cfg.vqgan.downsample), progress_bar=progress_bar)
    return ds


class _DiscriminatorStep(torch.nn.Module):
    """The discriminators' loss as one module's forward (what DistributedDataParallel wraps)."""

    def __init__(self, crit: torch.nn.Module):
        super().__init__()
        self.crit = crit

    def forward(self, x: torch.Tensor, recon: torch.Tensor, step: int, generator: torch.Generator):
        from types import SimpleNamespace

        return self.crit.discriminator_loss(x, SimpleNamespace(recon=recon), step, generator)


def _buffers(*modules: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) pairs: the EMA codebook and BatchNorm statistics change in forward passes."""
    return [(b, b.detach().clone()) for m in modules for b in m.buffers()]


def train_vqgan(data: str | Path, run: str | Path, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                device: str = "cpu", perceptual_weights: str | None = None, stop_after: int | None = None,
                progress_bar: bool = True, discard_diffusion: bool = False) -> Path:
    """Train (or resume) the VQ-GAN of ``run`` on the prepared dataset ``data``; returns ``RUN/vqgan``.

    ``stop_after`` ends this call after that many steps, as a killed job would (tests of resume).
    Errors (bad data, existing outputs without ``resume``/``overwrite``) are raised before anything
    in ``run`` is written or deleted. A VQ-GAN that will change (``overwrite``, or ``resume`` with steps
    left) while ``run`` holds a diffusion model trained on its latents is refused unless
    ``discard_diffusion``, which deletes that model, its latent cache and ``latent_stats.json``.
    """
    from lad.models.perceptual import PerceptualLoss
    from lad.training.losses import VQGANLoss

    run = Path(run)
    dev = init_distributed(resolve_device(device))  # torchrun: process group; cuda -> cuda:LOCAL_RANK
    check_global_batch(cfg.vqgan_train.batch_size, "vqgan_train.batch_size")
    ds = open_training_data(data, cfg, progress_bar=progress_bar)
    if cfg.precision == "fp16" and dev.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use fp32 (or bf16, slow on CPU) with --device cpu")
    if resume:
        check_resume_config(run, cfg, ("vqgan", "vqgan_train", "seed"))
    t = cfg.vqgan_train
    torch.manual_seed(cfg.seed)  # models are built (and their config checked) before the run folder is touched
    model = build_vqgan(cfg).to(dev)
    crit = VQGANLoss(l1_weight=t.l1_weight, perceptual_weight=t.perceptual_weight, perceptual=PerceptualLoss.maybe(perceptual_weights),
                     disc2d_weight=t.disc2d_weight, disc3d_weight=t.disc3d_weight, feature_matching_weight=t.feature_matching_weight,
                     locality_weight=t.locality_weight, disc_start=t.disc_start, disc_channels=t.disc_channels,
                     disc_layers=t.disc_layers, disc_kernel=t.disc_kernel, feature_matching=t.feature_matching).to(dev)
    downstream = check_downstream(run, cfg, resume=resume, overwrite=overwrite, discard=discard_diffusion)
    check_run_part(run, VQGAN_OUTPUTS, resume=resume, overwrite=overwrite)
    remove_downstream(run, downstream)
    run.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_config(cfg, run / "config.yaml")
    # data parallel (torchrun): global-batch BatchNorm statistics in the discriminators, DDP on the generator
    # and on the discriminators' loss; outside torchrun these are the modules themselves
    if get_world_size() > 1:
        crit = sync_batchnorm(crit, dev)
        crit.set_shard(get_rank(), get_world_size())
    model_step, disc_step = wrap_ddp(model, dev), wrap_ddp(_DiscriminatorStep(crit), dev)
    # fused Adam (one kernel for all tensors) as in the diffusion trainer
    opt_g = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas), fused=True)
    opt_d = torch.optim.Adam(crit.discriminator_parameters(), lr=t.lr, betas=tuple(t.betas), fused=True)
    scaler_g, scaler_d = make_grad_scaler(dev, cfg.precision), make_grad_scaler(dev, cfg.precision)
    modules, optims = {"vqgan": model, "loss": crit}, {"opt_g": opt_g, "opt_d": opt_d, "scaler_g": scaler_g, "scaler_d": scaler_d}
    ckpt = CheckpointManager(run / "checkpoints" / "vqgan", cfg.logging.keep_last)
    start = 0
    if resume and (state := load_latest_checkpoint(ckpt, modules, optims, dev)) is not None:
        start = state["step"]
        restore_rng_state(state["rng"])
    logger = Logger(run / "tensorboard" / "vqgan", jsonl=run / "logs" / "vqgan.jsonl", device=dev)
    guard, dguard = NonFiniteGuard(cfg.logging.max_nonfinite_steps), NonFiniteGuard(cfg.logging.max_nonfinite_steps)
    model.train()
    crit.train()
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    bar = progress(range(start, end), total=end - start, desc="vqgan", unit="step", disable=not progress_bar)
    t_last, n_last, t_data, running = time.perf_counter(), start, 0.0, float("nan")
    for step in bar:
        for opt in (opt_g, opt_d):  # a function of the step alone: a resumed run continues it exactly
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t)
        seed_step(cfg.seed, step, "vqgan")
        gen = step_generator(cfg.seed, step, "vqgan")
        t0 = time.perf_counter()
        batch = gather_batch(ds, shard_batch(batch_indices(step, t.batch_size, len(ds), cfg.seed)), dev)
        t_data += time.perf_counter() - t0
        x, mask = batch["image"], batch["mask"]
        saved = _buffers(model, crit)
        disc = crit.discriminator_parameters()
        for p in disc:  # the generator's pass needs no discriminator gradients (they would be discarded)
            p.requires_grad_(False)
        with autocast(dev, cfg.precision):
            out = model_step(x)
            g_loss, logs = crit.generator_loss(x, out, mask, step, gen)
        opt_g.zero_grad(set_to_none=True)
        scaler_g.scale(g_loss).backward()
        for p in disc:
            p.requires_grad_(True)
        scaler_g.unscale_(opt_g)
        g_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip, foreach=True)
        if guard.ok(g_loss, step, None if scaler_g.is_enabled() else g_norm):
            scaler_g.step(opt_g)
            scaler_g.update()
            if step >= t.disc_start:
                with autocast(dev, cfg.precision):
                    d_loss, dlogs = disc_step(x, out.recon.detach(), step, gen)
                opt_d.zero_grad(set_to_none=True)
                scaler_d.scale(d_loss).backward()
                scaler_d.unscale_(opt_d)
                d_norm = torch.nn.utils.clip_grad_norm_(crit.discriminator_parameters(), t.grad_clip, foreach=True)
                if dguard.ok(d_loss, step, None if scaler_d.is_enabled() else d_norm):
                    scaler_d.step(opt_d)
                    logs.update(dlogs)
                scaler_d.update()
            logs.update(perplexity=out.perplexity.detach(), codebook_usage=out.usage.detach(), grad_norm=g_norm.detach())
            logger.accumulate(logs)
        else:  # undo what the forward pass changed (EMA codebook, BatchNorm statistics)
            for b, copy in saved:
                b.copy_(copy)
            opt_g.zero_grad(set_to_none=True)
            scaler_g.update()
        done = step + 1
        if done % cfg.logging.log_every == 0 or done == end:
            now = time.perf_counter()
            rate = (done - n_last) / max(now - t_last, 1e-9)
            means = logger.flush(done, "vqgan", {"lr": opt_g.param_groups[0]["lr"], "steps_per_s": rate,
                                                 "samples_per_s": rate * t.batch_size, "step_time_s": 1 / max(rate, 1e-9),
                                                 "data_share": t_data / max(now - t_last, 1e-9), "skipped_steps": guard.skipped})
            running = means.get("total", running)
            t_last, n_last, t_data = now, done, 0.0
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{means.get('total', float('nan')):.4f}", ppl=f"{means.get('perplexity', 0):.0f}")
        if cfg.logging.image_every and done % cfg.logging.image_every == 0 and is_main_process():
            logger.image("vqgan/input_vs_recon", slice_grid([x[0], out.recon[0]]), done)
        # no checkpoint during a run of skipped (non-finite) steps: resume from the last healthy one
        if (done % cfg.logging.checkpoint_every == 0 or done == t.steps) and guard.in_a_row == 0:
            save_checkpoint(ckpt, done, modules, optims,
                            {"rng": capture_rng_state(), "data": data_state(done, t.batch_size, len(ds), cfg.seed)}, metric=running)
    logger.close()
    if end == t.steps and is_main_process():
        model.eval().save_pretrained(run / "vqgan", extra={"trained_steps": t.steps, "variant": cfg.variant})
        log.info("VQ-GAN saved to %s", run / "vqgan")
        from lad.evaluation.reconstruction import write_reconstruction_report

        rec = write_reconstruction_report(model, data, run / "vqgan_reconstruction.json", device=dev)
        log.info("VQ-GAN on the %s windows: MAE %.1f HU in the body, %d codes used", rec["split"], rec["mae_body_hu"] or float("nan"),
                 rec["codes_used"])
    return run / "vqgan"
