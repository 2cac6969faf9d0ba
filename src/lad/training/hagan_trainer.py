"""``lad train hagan``: the HA-GAN baseline of the Lad paper's Table 1 (section 4.2.1), after Sun et al. (2022),
"Hierarchical Amortized GAN for 3D High Resolution Medical Image Synthesis", and its public release's ``train.py``.

One iteration, as the release (networks in ``lad.models.hagan``):

1. D (D^H + D^L): a sub-volume start ``s`` is drawn; real = (the real sub-volume at ``s``, the real volume at low
   resolution), fake = G(z, s) for fresh noise z; non-saturating GAN loss (``BCEWithLogits``: real -> 1, fake -> 0).
2. G (G^A, G^H, G^L): fresh noise, the same ``s``; ``BCEWithLogits(D(G(z, s)), 1)``.
3. E^H: L1 between the real sub-volume and G^H(E^H(real sub-volume)) (G frozen, its gradient passed through).
4. E^G: E^H (frozen) encodes every sub-volume of the real volume, the features are concatenated along depth,
   z = E^G(features); loss (L1(G(z, s) sub-volume, real) + L1(G(z, s) low-res, real low-res)) / 2 (G frozen).

Adam with betas (0, 0.999) for all four networks (lr 1e-4 for G and the encoders, 4e-4 for D in the release).
Prepared windows in [0, 1] are mapped to the release's [-1, 1]; when ``hagan.image_shape`` differs from the
windows' shape they are first resized to it (trilinear), as the Lad paper resized depth 32 -> 256 for HA-GAN.

Determinism (``lad.training.common``): the batch of step ``t`` comes from the per-epoch permutation of
``(seed, epoch)``, and the sub-volume start and both noise draws from a generator seeded by ``(seed, t)``, so a
resumed run (``RUN/checkpoints/hagan/``) continues bit-for-bit (CPU) where the killed one stopped.

Outputs (a run folder of its own; a folder holding a Lad model is refused): ``RUN/hagan.yaml`` (the resolved
config), ``RUN/hagan/{generator,discriminator,encoder,sub_encoder}/`` (``config.json`` + ``model.safetensors``) and
``RUN/hagan/data.json`` (the windows' shape, spacing, organ and fingerprint, for ``lad sample``), ``RUN/logs/hagan.jsonl``,
``RUN/tensorboard/hagan/``. One process (no torchrun).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lad.config import save_config, to_dict
from lad.training.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from lad.training.common import (Logger, NonFiniteGuard, autocast, batch_indices, check_run_part, data_state, gather_batch,
                                 resolve_device, seed_step, slice_grid, step_generator, validate_dataset)
from lad.training.hagan_config import HAGANConfig
from lad.utils.atomic import atomic_dir, write_json
from lad.utils.log import get_logger, progress

__all__ = ["train_hagan", "build_hagan", "HAGANParts", "HAGAN_OUTPUTS", "to_model_space", "to_unit", "low_resolution",
           "discriminator_loss", "generator_loss", "encoder_loss", "sub_encoder_loss", "encode_volume"]

log = get_logger(__name__)

# What an HA-GAN training owns in its run folder.
HAGAN_OUTPUTS = ["hagan", "hagan.yaml", "checkpoints/hagan", "tensorboard/hagan", "logs/hagan.jsonl"]
# What marks a Lad run (VQ-GAN + diffusion): HA-GAN is trained into a folder of its own.
_LAD_PARTS = ["vqgan", "denoiser", "denoiser_ema", "checkpoints/vqgan", "checkpoints/diffusion"]


@dataclasses.dataclass
class HAGANParts:
    generator: torch.nn.Module
    discriminator: torch.nn.Module
    encoder: torch.nn.Module
    sub_encoder: torch.nn.Module

    def modules(self) -> dict[str, torch.nn.Module]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def build_hagan(cfg: HAGANConfig, data_shape: tuple[int, int, int]) -> HAGANParts:
    """The untrained networks of ``cfg.hagan`` for windows of ``data_shape`` (D, H, W); raises ``ValueError`` naming the
    size that does not fit (image shape, crop depth, channel counts)."""
    from lad.models.hagan import HAGANDiscriminator, HAGANEncoder, HAGANGenerator, HAGANSubEncoder

    m = cfg.hagan
    shape = tuple(m.image_shape) if m.image_shape is not None else tuple(data_shape)
    g = HAGANGenerator(image_shape=shape, latent_dim=m.latent_dim, crop_depth=m.crop_depth, trunk_channels=tuple(m.trunk_channels),
                       high_channels=tuple(m.high_channels), low_channels=tuple(m.low_channels), norm_num_groups=m.norm_num_groups)
    d = HAGANDiscriminator(image_shape=shape, crop_depth=m.crop_depth, low_res_factor=g.low_res_factor, channels=tuple(m.disc_channels),
                           features=m.disc_features, low_channels=tuple(m.disc_low_channels))
    e = HAGANEncoder(channels=tuple(m.encoder_channels), norm_num_groups=m.norm_num_groups)
    se = HAGANSubEncoder(input_shape=g.low_shape, in_channels=g.feature_channels, channels=tuple(m.sub_encoder_channels),
                         latent_dim=m.latent_dim, norm_num_groups=m.norm_num_groups)
    return HAGANParts(g, d, e, se)


def to_model_space(x01: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Windows (B, 1, D, H, W) in [0, 1] -> the model's volumes (B, 1, *shape) in [-1, 1] (trilinear when resized)."""
    if tuple(x01.shape[2:]) != tuple(shape):
        x01 = F.interpolate(x01, size=tuple(shape), mode="trilinear", align_corners=False)
    return x01 * 2 - 1


def to_unit(x: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The model's volumes in [-1, 1] -> [0, 1], resized to ``shape`` when given and different (area when shrinking
    every axis, ours: an average over the slices a sampled slice stands for; trilinear otherwise), clamped."""
    y = (x.float() + 1) / 2
    if shape is not None and tuple(y.shape[2:]) != tuple(shape):
        shrink = all(t <= s for t, s in zip(shape, y.shape[2:]))
        y = F.interpolate(y, size=tuple(shape), mode="area") if shrink else \
            F.interpolate(y, size=tuple(shape), mode="trilinear", align_corners=False)
    return y.clamp(0.0, 1.0)


def low_resolution(x: torch.Tensor, factor: int, mode: str = "nearest") -> torch.Tensor:
    """The real volume at 1/``factor`` resolution: "nearest" is the release's ``F.interpolate(x, scale_factor=1/f)``
    (the voxel at index ``f * i``), "area" the mean of each ``f^3`` block."""
    if mode == "nearest":
        return x[:, :, ::factor, ::factor, ::factor]
    if mode == "area":
        return F.avg_pool3d(x, factor)
    raise ValueError(f"low_res_mode must be nearest or area, got {mode!r}")


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))


def discriminator_loss(d, real_crop, real_small, fake_crop, fake_small, position: float) -> tuple[torch.Tensor, dict]:
    """D's loss: BCE(D(real), 1) + BCE(D(fake), 0) (the release's ``BCEWithLogitsLoss``)."""
    real = _bce(d(real_crop, real_small, position), 1.0)
    fake = _bce(d(fake_crop.detach(), fake_small.detach(), position), 0.0)
    return real + fake, {"d_real": real.detach(), "d_fake": fake.detach()}


def generator_loss(d, fake_crop, fake_small, position: float) -> torch.Tensor:
    """G's non-saturating loss: BCE(D(G(z)), 1)."""
    return _bce(d(fake_crop, fake_small, position), 1.0)


def encoder_loss(g, e, real_crop) -> torch.Tensor:
    """E^H's loss: L1 between a real sub-volume and G^H(E^H(sub-volume))."""
    return F.l1_loss(g.high_res(e(real_crop)), real_crop)


def encode_volume(e, x: torch.Tensor, crop_depth: int) -> torch.Tensor:
    """E^H features of every sub-volume of ``x`` (B, 1, D, H, W), concatenated along depth: (B, C, *low_shape)."""
    return torch.cat([e(x[:, :, i:i + crop_depth]) for i in range(0, x.shape[2], crop_depth)], dim=2)


def sub_encoder_loss(g, e, se, x, real_small, real_crop, crop_start: int) -> torch.Tensor:
    """E^G's loss: z = E^G(E^H features of the whole volume); (L1(sub-volume) + L1(low-res volume)) / 2 of G(z, s)."""
    with torch.no_grad():
        feats = encode_volume(e, x, g.crop_depth)
    rec_crop, rec_small = g(se(feats), crop_start)
    return (F.l1_loss(rec_crop, real_crop) + F.l1_loss(rec_small, real_small)) / 2


def _set_trainable(parts: HAGANParts, *names: str) -> None:
    for name, mod in parts.modules().items():
        mod.requires_grad_(name in names)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_resume_config(run: Path, cfg: HAGANConfig, ckpt: CheckpointManager) -> None:
    """On ``--resume``: refuse a config that differs from ``RUN/hagan.yaml`` (except the step count and the logging
    section) or a step count below the newest checkpoint."""
    done = ckpt.steps()
    if done and done[-1] > cfg.hagan_train.steps:
        raise ValueError(f"{ckpt.root}: --resume with hagan_train.steps={cfg.hagan_train.steps}, but the newest checkpoint "
                         f"is already at step {done[-1]}; resume with at least that many steps")
    f = run / "hagan.yaml"
    if not f.exists():
        return
    # through YAML both ways: tuples and lists compare equal
    saved = _flat(yaml.safe_load(f.read_text(encoding="utf-8")) or {})
    new = _flat(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    diff = sorted(k for k in set(saved) | set(new)
                  if k != "hagan_train.steps" and not k.startswith("logging.") and saved.get(k) != new.get(k))
    if diff:
        raise ValueError(f"{f}: --resume with a different config ({', '.join(diff)}); resume with the run's own config "
                         "(--preset/--set as before) or start a new run")


def train_hagan(data: str | Path, run: str | Path, cfg: HAGANConfig, *, resume: bool = False, overwrite: bool = False,
                device: str = "cpu", stop_after: int | None = None, progress_bar: bool = True) -> Path:
    """Train (or resume) HA-GAN on the training split of prepared dataset ``data`` into ``run``; returns ``RUN/hagan``.

    ``stop_after`` ends this call after that many steps, as a killed job would (tests of resume). Bad data, sizes that
    do not fit the windows and existing outputs without ``resume``/``overwrite`` are refused before ``run`` is touched.
    """
    from lad.data.dataset import PreparedDataset
    from lad.utils.distributed import env_world

    run = Path(run)
    if env_world()[1] > 1:
        raise ValueError("lad train hagan runs in one process; start it without torchrun")
    dev = resolve_device(device)
    if cfg.precision == "bf16" and dev.type == "cpu":
        log.warning("precision bf16 on CPU is far slower than fp32 on these machines (docs/training.md)")
    lad_parts = [p for p in _LAD_PARTS if (run / p).exists()]
    if lad_parts:
        raise FileExistsError(f"{run}: holds a Lad model ({', '.join(lad_parts)}); train HA-GAN into a run folder of its own")
    ds = PreparedDataset(data, split="train", organ_labels=False)
    validate_dataset(ds, progress_bar=progress_bar)
    t = cfg.hagan_train
    torch.manual_seed(cfg.seed)  # networks are built (and their sizes checked) before the run folder is touched
    parts = build_hagan(cfg, ds.shape)
    g, d, e, se = parts.generator, parts.discriminator, parts.encoder, parts.sub_encoder
    ckpt = CheckpointManager(run / "checkpoints" / "hagan", cfg.logging.keep_last)
    if resume:
        _check_resume_config(run, cfg, ckpt)
    check_run_part(run, HAGAN_OUTPUTS, resume=resume, overwrite=overwrite)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "hagan.yaml")
    for mod in parts.modules().values():
        mod.to(dev).train()
    betas = tuple(t.betas)
    opts = {"opt_g": torch.optim.Adam(g.parameters(), lr=t.lr_g, betas=betas, eps=1e-8),
            "opt_d": torch.optim.Adam(d.parameters(), lr=t.lr_d, betas=betas, eps=1e-8),
            "opt_e": torch.optim.Adam(e.parameters(), lr=t.lr_e, betas=betas, eps=1e-8),
            "opt_sub_e": torch.optim.Adam(se.parameters(), lr=t.lr_e, betas=betas, eps=1e-8)}
    start = 0
    if resume and (state := ckpt.load_latest(parts.modules(), opts, dev)) is not None:
        start = int(state["step"])
        restore_rng_state(state["rng"])
    logger = Logger(run / "tensorboard" / "hagan", jsonl=run / "logs" / "hagan.jsonl", device=dev)
    guards = {k: NonFiniteGuard(cfg.logging.max_nonfinite_steps) for k in ("d", "g", "e", "sub_e")}
    shape, f, crop = g.image_shape, g.low_res_factor, g.crop_depth
    max_start = shape[0] - crop
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    bar = progress(range(start, end), total=end - start, desc="hagan", unit="step", disable=not progress_bar)
    t_last, n_last = time.perf_counter(), start
    for step in bar:
        seed_step(cfg.seed, step, "hagan")
        gen = step_generator(cfg.seed, step, "hagan")
        batch = gather_batch(ds, batch_indices(step, t.batch_size, len(ds), cfg.seed), dev)
        s = f * int(torch.randint(g.crop_starts(), (1,), generator=gen))
        position = s / max_start if max_start else 0.0
        noise = torch.randn(2, t.batch_size, g.latent_dim, generator=gen).to(dev)
        with autocast(dev, cfg.precision):
            x = to_model_space(batch["image"], shape)
            real_small, real_crop = low_resolution(x, f, t.low_res_mode), x[:, :, s:s + crop]
            # 1. D on real vs fake (G frozen)
            _set_trainable(parts, "discriminator")
            with torch.no_grad():
                fake_crop, fake_small = g(noise[0], s)
            d_loss, logs = discriminator_loss(d, real_crop, real_small, fake_crop, fake_small, position)
        _optimise(opts["opt_d"], d_loss, guards["d"], step)
        # 2. G against the updated D (D frozen)
        _set_trainable(parts, "generator")
        with autocast(dev, cfg.precision):
            fake_crop, fake_small = g(noise[1], s)
            g_loss = generator_loss(d, fake_crop, fake_small, position)
        _optimise(opts["opt_g"], g_loss, guards["g"], step)
        # 3. E^H reconstructs the real sub-volume through G^H (G frozen)
        _set_trainable(parts, "encoder")
        with autocast(dev, cfg.precision):
            e_loss = encoder_loss(g, e, real_crop)
        _optimise(opts["opt_e"], e_loss, guards["e"], step)
        # 4. E^G: the whole volume through E^H (frozen), E^G and G (frozen)
        _set_trainable(parts, "sub_encoder")
        with autocast(dev, cfg.precision):
            sub_loss = sub_encoder_loss(g, e, se, x, real_small, real_crop, s)
        _optimise(opts["opt_sub_e"], sub_loss, guards["sub_e"], step)
        if all(gd.in_a_row == 0 for gd in guards.values()):  # no NaN in the logged means
            logs.update(d=d_loss.detach(), g=g_loss.detach(), e=e_loss.detach(), sub_e=sub_loss.detach())
            logger.accumulate(logs)
        done = step + 1
        if done % cfg.logging.log_every == 0 or done == end:
            now = time.perf_counter()
            rate = (done - n_last) / max(now - t_last, 1e-9)
            means = logger.flush(done, "hagan", {"steps_per_s": rate, "samples_per_s": rate * t.batch_size,
                                                 "skipped_steps": sum(gd.skipped for gd in guards.values())})
            t_last, n_last = now, done
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(d=f"{means.get('d', float('nan')):.3f}", g=f"{means.get('g', float('nan')):.3f}",
                                e=f"{means.get('e', float('nan')):.3f}")
        if cfg.logging.image_every and done % cfg.logging.image_every == 0:
            logger.image("hagan/real_vs_fake_subvolume", slice_grid([to_unit(real_crop[:1])[0], to_unit(fake_crop[:1].detach())[0]]), done)
        # no checkpoint during a run of skipped (non-finite) steps: resume from the last healthy one
        if (done % cfg.logging.checkpoint_every == 0 or done == t.steps) and all(gd.in_a_row == 0 for gd in guards.values()):
            ckpt.save(done, parts.modules(), opts, {"rng": capture_rng_state(), "data": data_state(done, t.batch_size, len(ds), cfg.seed)})
    logger.close()
    if end == t.steps:
        _save_parts(run / "hagan", parts, ds, cfg)
        log.info("HA-GAN saved to %s", run / "hagan")
    return run / "hagan"


def _optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, guard: NonFiniteGuard, step: int) -> None:
    """Backward and step, unless the loss is NaN/inf (then the step is skipped; the guard stops a run of them)."""
    opt.zero_grad(set_to_none=True)
    if guard.ok(loss, step):
        loss.backward()
        opt.step()


def _save_parts(folder: Path, parts: HAGANParts, ds, cfg: HAGANConfig) -> None:
    """``RUN/hagan/``: the four networks and ``data.json`` (what sampling needs from the data), atomically."""
    with atomic_dir(folder) as tmp:
        for name, mod in parts.modules().items():
            mod.eval().save_pretrained(tmp / name, extra={"trained_steps": cfg.hagan_train.steps})
        write_json(tmp / "data.json", {"image_shape": list(ds.shape), "model_shape": list(parts.generator.image_shape),
                                       "spacing": list(ds.config["spacing"]), "organ": ds.config.get("organ", "pancreas"),
                                       "fingerprint": ds.fingerprint, "trained_steps": cfg.hagan_train.steps, "seed": cfg.seed})
