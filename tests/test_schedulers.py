"""Noise schedulers: closed forms, exact recovery with an oracle model, per-sample generators, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from lad.schedulers import DDIMScheduler, DDPMScheduler, load_scheduler


def test_cosine_schedule_and_add_noise():
    s = DDPMScheduler(num_train_timesteps=300, schedule="cosine")
    a = s.alphas_cumprod
    assert a.shape == (300,) and torch.all(a[1:] < a[:-1]) and 0.99 < a[0] <= 1.0 and a[-1] < 1e-3
    # Nichol & Dhariwal: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) * pi/2); betas clipped at 0.999
    f = lambda t: math.cos(((t / 300) + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 50, 150):
        assert float(a[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-3)
    x0, noise, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([10, 200])
    z = s.add_noise(x0, noise, t)
    for i in range(2):
        ai = a[t[i]]
        assert torch.allclose(z[i], ai.sqrt() * x0[i] + (1 - ai).sqrt() * noise[i], atol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        DDPMScheduler(schedule="quadratic")


def _oracle(x0, sched):
    def eps(z, t):
        a = sched.alphas_cumprod[int(t)]
        return (z - a.sqrt() * x0) / (1 - a).sqrt()
    return eps


def test_ddim_with_oracle_recovers_x0_exactly():
    x0 = torch.randn(2, 4, 3, 3)
    s = DDIMScheduler(num_train_timesteps=300)
    s.set_timesteps(10)
    ts = s.timesteps
    assert len(ts) == 10 and torch.all(ts[:-1] > ts[1:]) and int(ts.max()) < 300 and int(ts.min()) >= 0
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = _oracle(x0, s)
    for t in ts:
        z = s.step(eps(z, t), t, z)
    assert torch.allclose(z, x0, atol=1e-4)


def test_ddpm_last_step_with_true_noise_returns_x0():
    s = DDPMScheduler(num_train_timesteps=300)
    s.set_timesteps(300)
    x0, noise = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    z1 = s.add_noise(x0, noise, torch.tensor([0]))
    out = s.step(noise, 0, z1)  # t = 0: posterior mean is x0, no noise added
    assert torch.allclose(out, x0, atol=1e-5)


def test_per_sample_generators_make_samples_batch_independent():
    s = DDPMScheduler(num_train_timesteps=300)
    s.set_timesteps(300)
    z, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    gens = lambda seeds: [torch.Generator().manual_seed(k) for k in seeds]
    full = s.step(eps, 100, z, generator=gens([1, 2, 3]))
    part = s.step(eps[1:2], 100, z[1:2], generator=gens([2]))
    assert torch.equal(full[1:2], part)
    with pytest.raises(ValueError, match="one generator per sample"):
        s.step(eps, 100, z, generator=gens([1]))


def test_save_load_round_trip(tmp_path):
    s = DDPMScheduler(num_train_timesteps=120, schedule="linear")
    s.save_pretrained(tmp_path / "sch")
    back = DDPMScheduler.from_pretrained(tmp_path / "sch")
    assert back.config == s.config and torch.equal(back.alphas_cumprod, s.alphas_cumprod)
    ddim = load_scheduler(tmp_path / "sch", "ddim")
    assert isinstance(ddim, DDIMScheduler) and torch.equal(ddim.alphas_cumprod, s.alphas_cumprod)
