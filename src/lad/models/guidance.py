"""Classifier-free guidance (paper 3.4.2, eq. 4) and the diffusion training objective.

Training drops the condition to the learned null condition with probability ``p_uncond`` (0.25);
sampling combines the two predictions as eq. (4):

    eps = (1 + w) * eps(z_t, c) - w * eps(z_t, null)

(note: *not* the ``eps_u + w (eps_c - eps_u)`` convention; with that one w = 1 would be the plain
conditional prediction, here w = 1 doubles the conditional direction).

Random draws use the caller's ``torch.Generator`` on that generator's device (the trainer's per-step
generator is a CPU one, so a run draws the same numbers on CPU and CUDA); results are moved to the
data's device.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["drop_condition", "guided_epsilon", "diffusion_loss"]

_Spatial = torch.Tensor | None


def _draw_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def drop_condition(cond: torch.Tensor, null_cond: torch.Tensor, p_uncond: float = 0.25,
                   generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1), spatial: _Spatial = None):
    """Replace each row of ``cond`` by ``null_cond`` with probability ``p_uncond`` (independently per row).

    ``cond``: (B, K) float; ``null_cond``: (K,) (the extractor's learned parameter: gradients flow into
    it through the dropped rows). One uniform number per row is drawn from ``generator``.
    Returns (B, K), same dtype and device as ``cond``. ``shard=(r, w)`` (data-parallel training: ``cond``
    holds rows ``r::w`` of a global batch of ``B * w``): the numbers are drawn for the global batch and
    rows ``r::w`` kept, so every row gets the draw one process would give it.
    ``spatial``: (B, S, *grid) spatial condition, dropped to zeros on the same rows; when given, the
    result is the pair ``(cond, spatial)``.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond!r}")
    if cond.ndim != 2 or null_cond.shape != cond.shape[1:]:
        raise ValueError(f"need cond (B, K) and null_cond (K,), got {tuple(cond.shape)} and {tuple(null_cond.shape)}")
    r, w = shard
    u = torch.rand(cond.shape[0] * w, generator=generator, device=_draw_device(generator, cond))[r::w]
    drop = (u < p_uncond).to(cond.device)
    out = torch.where(drop[:, None], null_cond.to(cond.dtype).expand_as(cond), cond)
    if spatial is None:
        return out
    keep = (~drop).to(spatial.dtype).view(-1, *([1] * (spatial.ndim - 1)))
    return out, spatial * keep


def guided_epsilon(denoiser: Callable[..., torch.Tensor], z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                   null_cond: torch.Tensor | None, guidance_scale: float = 1.0, spatial: _Spatial = None) -> torch.Tensor:
    """Guided noise prediction, eq. (4): ``(1 + w) * eps(z_t, c) - w * eps(z_t, null)``.

    ``z_t``: (B, C, *spatial) float; ``t``: (B,) long (or a scalar, broadcast); ``cond``: (B, K) or None
    for an unconditional denoiser (then a plain forward); ``null_cond``: (K,). ``w = 0`` returns the
    conditional prediction (one forward of batch B); otherwise both predictions come from ONE forward
    of batch 2B (conditional rows first). ``spatial``: (B, S, *spatial) map of a denoiser with a spatial
    condition (its null is zeros), passed as the fourth argument; None for the others.
    Returns eps (B, C, *spatial).
    """
    b = z_t.shape[0]
    t = t.reshape(-1).expand(b) if t.numel() == 1 else t
    extra = () if spatial is None else (spatial,)
    if cond is None:
        return denoiser(z_t, t, None, *extra)
    if guidance_scale == 0:
        return denoiser(z_t, t, cond, *extra)
    if null_cond is None:
        raise ValueError("guidance_scale != 0 needs the null condition (ConditionExtractor.null_cond)")
    null = null_cond.to(cond.dtype).expand_as(cond)
    if spatial is not None:
        extra = (torch.cat([spatial, torch.zeros_like(spatial)]),)
    eps = denoiser(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([cond, null]), *extra)
    eps_c, eps_u = eps[:b], eps[b:]
    return (1.0 + guidance_scale) * eps_c - guidance_scale * eps_u


def diffusion_loss(denoiser: Callable[..., torch.Tensor], scheduler, z0: torch.Tensor, cond: torch.Tensor | None,
                   generator: torch.Generator | None = None, loss: str = "l1",
                   shard: tuple[int, int] = (0, 1), spatial: _Spatial = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Denoising objective of one batch: ``t ~ U{0, ..., T-1}``, ``eps ~ N(0, I)``,
    ``z_t = scheduler.add_noise(z0, eps, t)``, ``loss(denoiser(z_t, t, cond), target)`` (mean over all elements).

    The target follows ``scheduler.config["prediction_type"]``: ``"epsilon"`` (the paper: ``eps``),
    ``"v_prediction"`` (``sqrt(a_t) eps - sqrt(1 - a_t) z0``, Salimans & Ho 2022), ``"sample"`` (``z0``) or
    ``"rectified_flow"`` (ours: ``lad.schedulers.RectifiedFlowScheduler``, ``z_t = (1 - s) z0 + s eps`` with
    ``s = (t + 1) / T``, target the velocity ``z0 - eps``; the same ``t`` draw).
    Classifier-free guidance combines v predictions with the same eq. (4) weights: v is affine in eps at a
    fixed ``z_t`` and the weights sum to one, so guiding v equals guiding eps (and so for the flow's velocity).

    ``z0``: (B, C, *spatial) float (scaled latent); ``cond``: (B, K) or None; ``scheduler`` needs
    ``num_train_timesteps`` and ``add_noise``; ``loss``: "l1" (the release) or "l2".
    Returns (scalar loss, logs) with logs = {"diffusion": the detached loss}. ``shard=(r, w)``: ``z0`` holds
    samples ``r::w`` of a global batch of ``B * w`` (data-parallel training); ``t`` and ``eps`` are drawn for
    the global batch and sliced, so each sample gets what one process would draw for it. ``spatial``: the
    spatial condition map of a denoiser that takes one (its fourth argument), else None.
    """
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")
    b, dev = z0.shape[0], _draw_device(generator, z0)
    r, w = shard
    t = torch.randint(0, int(scheduler.num_train_timesteps), (b * w,), generator=generator, device=dev)[r::w].to(z0.device)
    noise = torch.randn((b * w, *z0.shape[1:]), generator=generator, device=dev)[r::w].to(z0.device, z0.dtype)
    z_t = scheduler.add_noise(z0, noise, t)
    pred = denoiser(z_t, t, cond) if spatial is None else denoiser(z_t, t, cond, spatial)
    kind = getattr(scheduler, "config", {}).get("prediction_type", "epsilon")
    if kind == "epsilon":
        target = noise
    elif kind in ("v_prediction", "rectified_flow"):  # the scheduler's velocity: DDPM's v, or rectified flow's z0 - eps
        target = scheduler.get_velocity(z0, noise, t)
    else:
        target = z0
    value = F.l1_loss(pred.float(), target.float()) if loss == "l1" else F.mse_loss(pred.float(), target.float())
    return value, {"diffusion": value.detach()}
