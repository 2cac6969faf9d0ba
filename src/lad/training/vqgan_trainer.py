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
from pathlib import Path

import torch

from lad.config import save_config
from lad.training.common import (NonFiniteGuard, autocast, check_downstream, check_resume_config, check_run_part, gather_batch,
                                 make_grad_scaler, open_training_data, remove_downstream, slice_grid)
from lad.training.config import TrainConfig
from lad.training.loop import Trainer, TrainStep, Update, optimizer_step, training_device
from lad.training.parallel import sync_batchnorm, wrap_ddp
from lad.utils.distributed import get_rank, get_world_size
from lad.utils.log import get_logger, is_main_process

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


class _VQGANStep(TrainStep):
    """One VQ-GAN step for :class:`~lad.training.loop.Trainer`: the generator's loss (the loop steps ``opt_g`` on
    it), then, after a healthy generator step and from ``disc_start``, the discriminators' loss and ``opt_d``."""

    metric = "total"

    def __init__(self, ds, model, crit, model_step, disc_step, cfg: TrainConfig, dev: torch.device, *, run: Path, data):
        self.ds, self.model, self.crit, self.model_step, self.disc_step = ds, model, crit, model_step, disc_step
        self.t, self.precision, self.variant, self.dev, self.run, self.data = cfg.vqgan_train, cfg.precision, cfg.variant, dev, run, data
        t = self.t
        # fused Adam (one kernel for all tensors) as in the diffusion trainer
        opt_g = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas), fused=True)
        opt_d = torch.optim.Adam(crit.discriminator_parameters(), lr=t.lr, betas=tuple(t.betas), fused=True)
        scaler_g, scaler_d = make_grad_scaler(dev, cfg.precision), make_grad_scaler(dev, cfg.precision)
        self.modules = {"vqgan": model, "loss": crit}
        self.optimizers = {"opt_g": opt_g, "opt_d": opt_d, "scaler_g": scaler_g, "scaler_d": scaler_d}
        self.update = Update(opt_g, scaler_g, t.grad_clip)
        self.disc_update = Update(opt_d, scaler_d, t.grad_clip)
        self.dguard = NonFiniteGuard(cfg.logging.max_nonfinite_steps)

    def lr(self, step):  # a function of the step alone: a resumed run continues it exactly
        return lr_at(step, self.t)

    def batch(self, step, indices):
        return gather_batch(self.ds, indices, self.dev)

    def _disc_requires_grad(self, flag: bool) -> None:
        for p in self.crit.discriminator_parameters():
            p.requires_grad_(flag)

    def forward(self, batch, step, generator):
        self.x, mask = batch["image"], batch["mask"]
        self.saved = _buffers(self.model, self.crit)
        self._disc_requires_grad(False)  # the generator's pass needs no discriminator gradients (they would be discarded)
        with autocast(self.dev, self.precision):
            self.out = self.model_step(self.x)
            return self.crit.generator_loss(self.x, self.out, mask, step, generator)

    def after_update(self, step, generator, logs):
        self._disc_requires_grad(True)
        if step >= self.t.disc_start:
            with autocast(self.dev, self.precision):
                d_loss, dlogs = self.disc_step(self.x, self.out.recon.detach(), step, generator)
            if optimizer_step(d_loss, self.disc_update, self.dguard, step)[0]:
                logs.update(dlogs)
        logs.update(perplexity=self.out.perplexity.detach(), codebook_usage=self.out.usage.detach())

    def on_skip(self, step):  # undo what the forward pass changed (EMA codebook, BatchNorm statistics)
        self._disc_requires_grad(True)
        for b, copy in self.saved:
            b.copy_(copy)

    def postfix(self, means):
        return {"loss": f"{means.get('total', float('nan')):.4f}", "ppl": f"{means.get('perplexity', 0):.0f}"}

    def images(self, step, generator, logger):
        logger.image("vqgan/input_vs_recon", slice_grid([self.x[0], self.out.recon[0]]), step)

    def finish(self):
        self.model.eval().save_pretrained(self.run / "vqgan", extra={"trained_steps": self.t.steps, "variant": self.variant})
        log.info("VQ-GAN saved to %s", self.run / "vqgan")
        from lad.evaluation.reconstruction import reconstruction_report, write_reconstruction_report
        from lad.utils.atomic import write_json

        f = self.run / "vqgan_reconstruction.json"
        if isinstance(self.data, (str, Path)):
            rec = write_reconstruction_report(self.model, self.data, f, device=self.dev)
        else:  # a Dataset object: no held-out split to measure on
            rec = {**reconstruction_report(self.model, self.ds, device=self.dev), "split": "train (a Dataset object)",
                   "data": f"<{type(self.ds).__name__}>"}
            write_json(f, rec)
        log.info("VQ-GAN on the %s windows: MAE %.1f HU in the body, %d codes used", rec["split"], rec["mae_body_hu"] or float("nan"),
                 rec["codes_used"])


def train_vqgan(data: str | Path | torch.utils.data.Dataset, run: str | Path, cfg: TrainConfig, *, resume: bool = False,
                overwrite: bool = False, device: str = "cpu", perceptual_weights: str | None = None, stop_after: int | None = None,
                progress_bar: bool = True, discard_diffusion: bool = False) -> Path:
    """Train (or resume) the VQ-GAN of ``run``; returns ``RUN/vqgan``.

    ``data``: a prepared dataset folder (its training split) or a ``torch.utils.data.Dataset`` whose items are
    ``PreparedDataset``'s (``image`` (1, D, H, W) float32 in [0, 1], ``mask`` (1, D, H, W) uint8 in {0, 1, 2}).
    ``stop_after`` ends this call after that many steps, as a killed job would (tests of resume).
    Errors (bad data, existing outputs without ``resume``/``overwrite``) are raised before anything
    in ``run`` is written or deleted. A VQ-GAN that will change (``overwrite``, or ``resume`` with steps
    left) while ``run`` holds a diffusion model trained on its latents is refused unless
    ``discard_diffusion``, which deletes that model, its latent cache and ``latent_stats.json``.
    """
    from lad.models.perceptual import PerceptualLoss
    from lad.training.losses import VQGANLoss

    run = Path(run)
    dev = training_device(device, cfg.precision, cfg.vqgan_train.batch_size, "vqgan_train.batch_size")
    ds = open_training_data(data, cfg, progress_bar=progress_bar)
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
    step = _VQGANStep(ds, model, crit, wrap_ddp(model, dev), wrap_ddp(_DiscriminatorStep(crit), dev), cfg, dev, run=run, data=data)
    model.train()
    crit.train()
    trainer = Trainer.from_logging(step, cfg.logging, steps=t.steps, part="vqgan", device=dev, seed=cfg.seed, num_samples=len(ds),
                                   batch_size=t.batch_size, checkpoints=run / "checkpoints" / "vqgan",
                                   tensorboard=run / "tensorboard" / "vqgan", jsonl=run / "logs" / "vqgan.jsonl",
                                   progress_bar=progress_bar)
    trainer.run(resume=resume, stop_after=stop_after)
    return run / "vqgan"
