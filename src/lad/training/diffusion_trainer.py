"""``lad train diffusion``: the conditional latent DDPM with classifier-free guidance (paper 3.3-3.4).

Trains the denoiser and the Condition Extractor's trainable layers jointly on cached latents of the
frozen VQ-GAN; the condition is replaced by the learned null condition with probability p_uncond.
An exponential moving average of both (``lad.training.ema.make_ema``: PyTorch's ``AveragedModel``
with an EMA average) is what ``lad sample`` uses: ``RUN/denoiser_ema`` + ``RUN/condition``; the raw weights are
kept in ``RUN/denoiser`` + ``RUN/condition_raw``.

Under ``torchrun`` (``lad.training.parallel``): the denoiser and the Condition Extractor's trainable
layers are wrapped in DistributedDataParallel, ``batch_size`` is the global batch (rank ``r`` takes its
samples ``r::world``), timesteps, noise and condition dropout are drawn for the global batch and
sliced; the latent cache is built in shards by all ranks; rank 0 alone writes logs, checkpoints and weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lad.config import save_config
from lad.training.common import autocast, check_resume_config, check_run_part, make_grad_scaler, open_training_data, slice_grid
from lad.training.config import TrainConfig
from lad.training.loop import Trainer, TrainStep, Update, training_device
from lad.training.parallel import wrap_ddp
from lad.utils.distributed import get_rank, get_world_size
from lad.training.ema import ema_step, make_ema
from lad.utils.atomic import write_json
from lad.utils.log import get_logger, is_main_process

__all__ = ["train_diffusion", "build_diffusion_models", "DIFFUSION_OUTPUTS"]

DIFFUSION_OUTPUTS = ["denoiser", "denoiser_ema", "condition", "condition_raw", "scheduler", "checkpoints/diffusion",
                     "tensorboard/diffusion", "logs/diffusion.jsonl"]

log = get_logger(__name__)


def build_diffusion_models(cfg: TrainConfig, latent_shape: tuple[int, ...], num_slices: int) -> nn.ModuleDict:
    """``{"denoiser": LatentDenoiser, "condition": ConditionExtractor (conditional variants only)}``."""
    from lad.models.condition import SPATIAL_CHANNELS, ConditionExtractor
    from lad.models.denoiser import LatentDenoiser

    parts = nn.ModuleDict()
    cond_dim = 0
    if cfg.conditional:
        c = cfg.condition
        parts["condition"] = ConditionExtractor(latent_channels=latent_shape[0], latent_shape=tuple(latent_shape[1:]),
                                                num_slices=num_slices, use_content=c.use_content, use_structure=c.use_structure,
                                                structure_dim=c.structure_dim)
        cond_dim = parts["condition"].cond_dim
    d = cfg.denoiser
    parts["denoiser"] = LatentDenoiser(spatial_dims=3, in_channels=latent_shape[0], out_channels=latent_shape[0],
                                       channels=tuple(d.channels), attention_levels=tuple(d.attention_levels),
                                       num_res_blocks=d.num_res_blocks, num_head_channels=d.num_head_channels,
                                       norm_num_groups=d.norm_num_groups, cond_dim=cond_dim, conditioning=d.conditioning,
                                       spatial_channels=SPATIAL_CHANNELS if cfg.conditional and cfg.condition.spatial else 0)
    return parts


def _conditions(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Condition vectors of a cached batch; Betti counts enter as log1p (``lad.topology.normalize_betti``)."""
    if "condition" not in net:
        return None
    betti = batch.get("betti")
    betti = torch.log1p(betti.float()) if betti is not None else None
    return net["condition"](batch.get("mask_z"), betti)


def _spatial(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The cached spatial condition (``mask_lr``) of a denoiser that takes one, else None."""
    return batch["mask_lr"] if net["denoiser"].spatial_channels else None


class _DiffusionStep(nn.Module):
    """Condition (with classifier-free dropout) + epsilon loss of one batch as one module's forward (what
    DistributedDataParallel wraps). ``shard=(rank, world)``: draws are made for the global batch and sliced."""

    def __init__(self, net: nn.ModuleDict, scheduler, loss_fn, drop_fn, *, p_uncond: float, loss: str, shard: tuple[int, int]):
        super().__init__()
        self.net, self.scheduler, self.loss_fn, self.drop_fn = net, scheduler, loss_fn, drop_fn
        self.p_uncond, self.loss, self.shard = p_uncond, loss, shard

    def forward(self, batch: dict[str, torch.Tensor], z0: torch.Tensor, generator: torch.Generator):
        kw = {"shard": self.shard} if self.shard[1] > 1 else {}
        cond, spatial = _conditions(self.net, batch), _spatial(self.net, batch)
        if spatial is not None:
            cond, spatial = self.drop_fn(cond, self.net["condition"].null_cond, self.p_uncond, generator, spatial=spatial, **kw)
            kw["spatial"] = spatial
        elif cond is not None:
            cond = self.drop_fn(cond, self.net["condition"].null_cond, self.p_uncond, generator, **kw)
        return self.loss_fn(self.net["denoiser"], self.scheduler, z0, cond, generator=generator, loss=self.loss, **kw)


class _DiffusionTrainStep(TrainStep):
    """One diffusion step for :class:`~lad.training.loop.Trainer`: a batch of cached latents, the diffusion loss
    (with classifier-free condition dropout), then the EMA update after a healthy optimiser step."""

    metric = "diffusion"

    def __init__(self, ds, cache, net, ema, train_step, scheduler, vqgan, latent_scaler, cfg: TrainConfig, dev: torch.device, *,
                 run: Path, stats: dict):
        self.ds, self.cache, self.net, self.ema, self.train_step, self.scheduler, self.vqgan = ds, cache, net, ema, train_step, scheduler, vqgan
        self.latent_scaler, self.t, self.cfg, self.dev, self.run, self.stats = latent_scaler, cfg.diffusion_train, cfg, dev, run, stats
        # fused Adam + foreach clipping: 1.31x faster denoiser step at the demo latent on CPU (0.94 vs 1.23 CPU s,
        # benchmarks/README.md); the many small per-tensor ops of the default path dominated the profile
        opt = torch.optim.Adam(net.parameters(), lr=self.t.lr, fused=True)
        scaler = make_grad_scaler(dev, cfg.precision)
        self.modules, self.optimizers = {"net": net, "ema": ema}, {"opt": opt, "scaler": scaler}
        self.update = Update(opt, scaler, self.t.grad_clip)

    def batch(self, step, indices):
        self.idx = torch.from_numpy(indices)
        return {k: v[self.idx].to(self.dev, non_blocking=True) for k, v in self.cache.items()}

    def forward(self, batch, step, generator):
        self.last = batch
        z0 = self.latent_scaler.scale(batch["z"])
        with autocast(self.dev, self.cfg.precision):
            return self.train_step(batch, z0, generator)

    def after_update(self, step, generator, logs):
        ema_step(self.ema, self.net, step, every=self.t.ema_every, start=self.t.ema_start)

    def images(self, step, generator, logger):
        masks = [torch.from_numpy(self.ds[int(i)]["mask"]).float() / 2 for i in self.idx[:2]]
        logger.image("diffusion/samples", _preview(self.ema.module, self.vqgan, self.last, masks, self.latent_scaler, self.scheduler,
                                                   generator, self.dev), step)

    def finish(self):
        run, net, ema = self.run, self.net, self.ema
        extra = {"trained_steps": self.t.steps, "variant": self.cfg.variant}
        net.eval()
        net["denoiser"].save_pretrained(run / "denoiser", extra=extra)
        ema.module["denoiser"].save_pretrained(run / "denoiser_ema", extra=extra)
        if "condition" in net:
            net["condition"].save_pretrained(run / "condition_raw", extra=extra)
            ema.module["condition"].save_pretrained(run / "condition", extra=extra)
        self.scheduler.save_pretrained(run / "scheduler")
        write_json(run / "latent_stats.json", self.stats)
        log.info("diffusion model saved to %s", run)


def train_diffusion(data: str | Path | torch.utils.data.Dataset, run: str | Path, cfg: TrainConfig, *, resume: bool = False,
                    overwrite: bool = False, device: str = "cpu", stop_after: int | None = None, progress_bar: bool = True) -> Path:
    """Train (or resume) the conditional latent diffusion model of ``run``; returns ``RUN/denoiser_ema``.

    ``data``: a prepared dataset folder (its training split) or a ``torch.utils.data.Dataset`` of the same items
    (``image``, ``mask``) with a ``spacing`` attribute ((x, y, z) mm, recorded for the samples' NIfTI headers).
    Needs ``RUN/vqgan`` (``train_vqgan``). The VQ-GAN's latents of the training windows are cached in
    ``RUN/latent_cache`` (reused while ``RUN/vqgan/model.safetensors`` and the data are unchanged).
    ``stop_after`` ends this call after that many steps (as a killed job would); errors are raised
    before anything in ``run`` is written or deleted.
    """
    from lad.data.dataset import describe_dataset
    from lad.models import guidance
    from lad.models.vqgan import VQGAN
    from lad.schedulers import RECTIFIED_FLOW, DDPMScheduler, RectifiedFlowScheduler
    from lad.training.latents import LatentScaler, build_latent_cache, file_hash

    run = Path(run)
    dev = training_device(device, cfg.precision, cfg.diffusion_train.batch_size, "diffusion_train.batch_size")
    if not (run / "vqgan" / "model.safetensors").exists():
        raise FileNotFoundError(f"{run}: no trained VQ-GAN; run `lad train vqgan --run {run}` first")
    ds = open_training_data(data, cfg, progress_bar=progress_bar)
    info = describe_dataset(ds)
    if info.spacing is None:
        raise ValueError(f"{info.name}: the dataset object has no `spacing` attribute ((x, y, z) voxel size in mm); the run "
                         "records it in latent_stats.json for the samples' NIfTI headers: set it on the dataset")
    vqgan = VQGAN.from_pretrained(run / "vqgan", map_location=dev).to(dev).eval().requires_grad_(False)
    latent_shape = tuple(vqgan.latent_shape(info.shape))
    expected = (cfg.vqgan.embedding_dim, *(s // f for s, f in zip(info.shape, cfg.vqgan.downsample)))
    vc = vqgan.config
    pairs = {"embedding_dim": (vc["embedding_dim"], cfg.vqgan.embedding_dim),
             "downsample": (list(vc["downsample"]), list(cfg.vqgan.downsample)),
             "channels": (list(vc["channels"]), list(cfg.vqgan.channels))}
    differ = "; ".join(f"{k} {a} (VQ-GAN) vs {b} (config)" for k, (a, b) in pairs.items() if a != b)
    if latent_shape != expected:
        raise ValueError(f"{run / 'vqgan'}: VQ-GAN latent shape {latent_shape} does not match the diffusion config's latent "
                         f"shape {expected} ({differ}); train both parts with the same --preset and --set values")
    if differ:
        raise ValueError(f"{run / 'vqgan'}: the VQ-GAN does not match the diffusion config ({differ}; both give latent shape "
                         f"{latent_shape}); train both parts with the same --preset and --set values")
    if resume:
        check_resume_config(run, cfg, ("vqgan", "denoiser", "diffusion_train", "condition", "variant", "seed"))
    t = cfg.diffusion_train
    torch.manual_seed(cfg.seed)  # models are built (and their config checked) before the run folder is touched
    net = build_diffusion_models(cfg, latent_shape, info.shape[0]).to(dev)
    check_run_part(run, DIFFUSION_OUTPUTS, resume=resume, overwrite=overwrite)
    if is_main_process():
        save_config(cfg, run / "config.yaml")
    c = cfg.condition
    cache = build_latent_cache(run, ds, vqgan, content=cfg.conditional and c.use_content,
                               structure=cfg.conditional and c.use_structure, device=dev,
                               spatial=tuple(cfg.vqgan.downsample) if net["denoiser"].spatial_channels else None,
                               progress_bar=progress_bar)
    latent_scaler = LatentScaler.fit(cache["z"])
    stats = latent_scaler.to_dict()
    stats.update(latent_shape=list(latent_shape), image_shape=list(info.shape), spacing=list(info.spacing),
                 organ=info.organ, fingerprint=info.fingerprint,
                 vqgan_hash=file_hash(run / "vqgan" / "model.safetensors"))
    latent_scaler = latent_scaler.to(dev)

    ema = make_ema(net, decay=t.ema_decay)
    if t.prediction == RECTIFIED_FLOW:  # ours: rectified flow on the same integer timesteps (schedule, beta_max unused)
        scheduler = RectifiedFlowScheduler(num_train_timesteps=t.timesteps)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=t.timesteps, schedule=t.schedule, prediction_type=t.prediction,
                                  beta_max=t.beta_max)
    # data parallel (torchrun): DDP on the denoiser + Condition Extractor; the module itself outside torchrun
    train_step = wrap_ddp(_DiffusionStep(net, scheduler, guidance.diffusion_loss, guidance.drop_condition, p_uncond=t.p_uncond,
                                         loss=t.loss, shard=(get_rank(), get_world_size())), dev)
    step = _DiffusionTrainStep(ds, cache, net, ema, train_step, scheduler, vqgan, latent_scaler, cfg, dev, run=run, stats=stats)
    net.train()
    trainer = Trainer.from_logging(step, cfg.logging, steps=t.steps, part="diffusion", device=dev, seed=cfg.seed, num_samples=len(ds),
                                   batch_size=t.batch_size, checkpoints=run / "checkpoints" / "diffusion",
                                   tensorboard=run / "tensorboard" / "diffusion", jsonl=run / "logs" / "diffusion.jsonl",
                                   progress_bar=progress_bar)
    trainer.run(resume=resume, stop_after=stop_after)
    return run / "denoiser_ema"


@torch.no_grad()
def _preview(net, vqgan, batch, masks, latent_scaler, scheduler, gen, dev, steps: int = 10):
    """Two conditional samples (EMA weights, 10 DDIM steps, Euler for rectified flow, guidance 1) decoded, each row
    followed by the row of its conditioning mask (label / 2): axial + coronal middle slices. A cheap progress picture."""
    from lad.models.guidance import guided_epsilon
    from lad.schedulers import RECTIFIED_FLOW, sampling_scheduler

    n = min(2, batch["z"].shape[0])
    sub = {k: v[:n] for k, v in batch.items()}
    cond, spatial = _conditions(net, sub), _spatial(net, sub)
    null = net["condition"].null_cond if "condition" in net else None
    ddim = sampling_scheduler(scheduler.config, "euler" if scheduler.config["prediction_type"] == RECTIFIED_FLOW else "ddim")
    ddim.set_timesteps(steps)
    z = torch.randn(sub["z"].shape, generator=gen).to(dev)
    for tt in ddim.timesteps:
        eps = guided_epsilon(net["denoiser"], z, torch.full((n,), int(tt), device=dev, dtype=torch.long), cond, null, 1.0,
                             spatial=spatial)
        z = ddim.step(eps, tt, z)
    x = vqgan.decode_latent(latent_scaler.unscale(z))
    rows = []
    for i in range(n):
        rows += [x[i], masks[i]]
    return slice_grid(rows)
