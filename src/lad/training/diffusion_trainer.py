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

import time
from pathlib import Path

import torch
from torch import nn

from lad.config import save_config
from lad.training.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from lad.training.common import (Logger, NonFiniteGuard, autocast, batch_indices, check_resume_config, check_run_part, data_state,
                                 load_latest_checkpoint, make_grad_scaler, resolve_device, save_checkpoint, seed_step, slice_grid,
                                 step_generator)
from lad.training.config import TrainConfig
from lad.training.parallel import check_global_batch, shard_batch, wrap_ddp
from lad.utils.distributed import get_rank, get_world_size, init_distributed
from lad.training.ema import ema_step, make_ema
from lad.utils.atomic import write_json
from lad.utils.log import get_logger, is_main_process, progress

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


def train_diffusion(data: str | Path, run: str | Path, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                    device: str = "cpu", stop_after: int | None = None, progress_bar: bool = True) -> Path:
    """Train (or resume) the conditional latent diffusion model of ``run``; returns ``RUN/denoiser_ema``.

    Needs ``RUN/vqgan`` (``train_vqgan``). The VQ-GAN's latents of the training windows are cached in
    ``RUN/latent_cache`` (reused while ``RUN/vqgan/model.safetensors`` and the data are unchanged).
    ``stop_after`` ends this call after that many steps (as a killed job would); errors are raised
    before anything in ``run`` is written or deleted.
    """
    from lad.models import guidance
    from lad.models.vqgan import VQGAN
    from lad.schedulers import RECTIFIED_FLOW, DDPMScheduler, RectifiedFlowScheduler
    from lad.training.latents import LatentScaler, build_latent_cache, file_hash
    from lad.training.vqgan_trainer import open_training_data

    run = Path(run)
    dev = init_distributed(resolve_device(device))  # torchrun: process group; cuda -> cuda:LOCAL_RANK
    check_global_batch(cfg.diffusion_train.batch_size, "diffusion_train.batch_size")
    if not (run / "vqgan" / "model.safetensors").exists():
        raise FileNotFoundError(f"{run}: no trained VQ-GAN; run `lad train vqgan --run {run}` first")
    ds = open_training_data(data, cfg, progress_bar=progress_bar)
    if cfg.precision == "fp16" and dev.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use fp32 (or bf16, slow on CPU) with --device cpu")
    vqgan = VQGAN.from_pretrained(run / "vqgan", map_location=dev).to(dev).eval().requires_grad_(False)
    latent_shape = tuple(vqgan.latent_shape(ds.shape))
    expected = (cfg.vqgan.embedding_dim, *(s // f for s, f in zip(ds.shape, cfg.vqgan.downsample)))
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
    net = build_diffusion_models(cfg, latent_shape, ds.shape[0]).to(dev)
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
    stats.update(latent_shape=list(latent_shape), image_shape=list(ds.shape), spacing=list(ds.config["spacing"]),
                 organ=ds.config.get("organ", "pancreas"), fingerprint=ds.fingerprint,
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
    # fused Adam + foreach clipping: 1.31x faster denoiser step at the demo latent on CPU (0.94 vs 1.23 CPU s,
    # benchmarks/README.md); the many small per-tensor ops of the default path dominated the profile
    opt = torch.optim.Adam(net.parameters(), lr=t.lr, fused=True)
    scaler = make_grad_scaler(dev, cfg.precision)
    modules, optims = {"net": net, "ema": ema}, {"opt": opt, "scaler": scaler}
    ckpt = CheckpointManager(run / "checkpoints" / "diffusion", cfg.logging.keep_last)
    start = 0
    if resume and (state := load_latest_checkpoint(ckpt, modules, optims, dev)) is not None:
        start = state["step"]
        restore_rng_state(state["rng"])
    logger = Logger(run / "tensorboard" / "diffusion", jsonl=run / "logs" / "diffusion.jsonl", device=dev)
    guard = NonFiniteGuard(cfg.logging.max_nonfinite_steps)
    net.train()
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    bar = progress(range(start, end), total=end - start, desc="diffusion", unit="step", disable=not progress_bar)
    t_last, n_last, t_data, running = time.perf_counter(), start, 0.0, float("nan")
    for step in bar:
        seed_step(cfg.seed, step, "diffusion")
        gen = step_generator(cfg.seed, step, "diffusion")
        t0 = time.perf_counter()
        idx = torch.from_numpy(shard_batch(batch_indices(step, t.batch_size, len(ds), cfg.seed)))
        batch = {k: v[idx].to(dev, non_blocking=True) for k, v in cache.items()}
        t_data += time.perf_counter() - t0
        z0 = latent_scaler.scale(batch["z"])
        with autocast(dev, cfg.precision):
            loss, logs = train_step(batch, z0, gen)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        g_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip, foreach=True)
        if guard.ok(loss, step, None if scaler.is_enabled() else g_norm):
            scaler.step(opt)
            ema_step(ema, net, step, every=t.ema_every, start=t.ema_start)
            logs["grad_norm"] = g_norm.detach()
            logger.accumulate(logs)
        else:
            opt.zero_grad(set_to_none=True)
        scaler.update()
        done = step + 1
        if done % cfg.logging.log_every == 0 or done == end:
            now = time.perf_counter()
            rate = (done - n_last) / max(now - t_last, 1e-9)
            means = logger.flush(done, "diffusion", {"lr": opt.param_groups[0]["lr"], "steps_per_s": rate,
                                                     "samples_per_s": rate * t.batch_size, "step_time_s": 1 / max(rate, 1e-9),
                                                     "data_share": t_data / max(now - t_last, 1e-9),
                                                     "skipped_steps": guard.skipped})
            running = means.get("diffusion", running)
            t_last, n_last, t_data = now, done, 0.0
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{means.get('diffusion', float('nan')):.4f}")
        if cfg.logging.image_every and done % cfg.logging.image_every == 0 and is_main_process():
            masks = [torch.from_numpy(ds[int(i)]["mask"]).float() / 2 for i in idx[:2]]
            logger.image("diffusion/samples", _preview(ema.module, vqgan, batch, masks, latent_scaler, scheduler, gen, dev), done)
        # no checkpoint during a run of skipped (non-finite) steps: resume from the last healthy one
        if (done % cfg.logging.checkpoint_every == 0 or done == t.steps) and guard.in_a_row == 0:
            save_checkpoint(ckpt, done, modules, optims,
                            {"rng": capture_rng_state(), "data": data_state(done, t.batch_size, len(ds), cfg.seed)}, metric=running)
    logger.close()
    if end == t.steps and is_main_process():
        extra = {"trained_steps": t.steps, "variant": cfg.variant}
        net.eval()
        net["denoiser"].save_pretrained(run / "denoiser", extra=extra)
        ema.module["denoiser"].save_pretrained(run / "denoiser_ema", extra=extra)
        if "condition" in net:
            net["condition"].save_pretrained(run / "condition_raw", extra=extra)
            ema.module["condition"].save_pretrained(run / "condition", extra=extra)
        scheduler.save_pretrained(run / "scheduler")
        write_json(run / "latent_stats.json", stats)
        log.info("diffusion model saved to %s", run)
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
