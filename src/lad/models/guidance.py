"""Classifier-free guidance (paper eq. 4) and the diffusion training objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["drop_condition", "guided_epsilon", "diffusion_loss"]


def drop_condition(cond: torch.Tensor, null_cond: torch.Tensor, p_uncond: float = 0.25,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each row of ``cond`` (B, K) by the learned ``null_cond`` (K,) with probability ``p_uncond``."""
    drop = torch.rand(cond.shape[0], generator=generator, device="cpu").to(cond.device) < p_uncond
    return torch.where(drop[:, None], null_cond.to(cond.dtype).expand_as(cond), cond)


def guided_epsilon(denoiser, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                   null_cond: torch.Tensor | None, guidance_scale: float = 1.0) -> torch.Tensor:
    """eq. (4): ``(1 + w) * eps(z, c) - w * eps(z, null)``, both passes in one batched forward.

    ``w = 0`` returns the conditional prediction; an unconditional model (``cond`` None) is called plainly.
    """
    if cond is None:
        return denoiser(z_t, t, None)
    if guidance_scale == 0:
        return denoiser(z_t, t, cond)
    b = z_t.shape[0]
    eps = denoiser(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([cond, null_cond.expand_as(cond)]))
    eps_c, eps_u = eps[:b], eps[b:]
    return (1 + guidance_scale) * eps_c - guidance_scale * eps_u


def diffusion_loss(denoiser, scheduler, z0: torch.Tensor, cond: torch.Tensor | None,
                   generator: torch.Generator | None = None, loss: str = "l1"):
    """Epsilon objective: t ~ U[0, T), z_t = add_noise(z0, eps, t), loss(denoiser(z_t, t, c), eps)."""
    b = z0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator, device="cpu").to(z0.device)
    noise = torch.randn(z0.shape, generator=generator, device="cpu").to(z0.device, z0.dtype)
    z_t = scheduler.add_noise(z0, noise, t)
    pred = denoiser(z_t, t, cond)
    if loss == "l1":
        value = F.l1_loss(pred, noise)
    elif loss == "l2":
        value = F.mse_loss(pred, noise)
    else:
        raise ValueError(f"loss must be l1 or l2, got {loss!r}")
    return value, {"diffusion": value.detach()}
