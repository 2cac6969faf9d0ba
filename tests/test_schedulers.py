"""Noise schedulers: closed forms, hand-computed steps, exact recovery with an oracle model, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lad.schedulers import DDIMScheduler, DDPMScheduler, load_scheduler

T = 300


def _cosine_abar(t: int, n: int = T, s: float = 0.008) -> float:
    """Nichol & Dhariwal by hand: alpha_bar after step t (0-based) = prod (1 - beta_i), beta_i =
    min(1 - f(i + 1) / f(i), 0.999), f(u) = cos^2((u / n + s) / (1 + s) * pi / 2); = f(t + 1) / f(0) below the clip."""
    f = lambda u: math.cos(((u / n) + s) / (1 + s) * math.pi / 2) ** 2
    return math.prod(1 - min(1 - f(i + 1) / f(i), 0.999) for i in range(t + 1))


def _oracle(x0: torch.Tensor, n: int = T):
    """Perfect epsilon model for a known x0: (x_t - sqrt(a_t) x0) / sqrt(1 - a_t), a_t computed by hand."""

    def eps(z, t):
        at = _cosine_abar(int(t), n)
        return (z - math.sqrt(at) * x0) / math.sqrt(1 - at)

    return eps


def test_cosine_and_linear_tables():
    s = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    a = s.alphas_cumprod
    assert a.shape == (T,) and a.dtype == torch.float32
    assert torch.all(a[1:] < a[:-1]) and 0.9998 < a[0] < 1.0 and a[-1] < 1e-7
    f = lambda u: math.cos(((u / T) + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 1, 50, 150, 250):
        assert float(a[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert float(a[-1]) == pytest.approx(float(a[-2]) * 0.001, rel=1e-5)  # last beta clipped at 0.999
    lin = DDPMScheduler(num_train_timesteps=100, schedule="linear", beta_start=1e-4, beta_end=2e-2)
    assert float(lin.betas[0]) == pytest.approx(1e-4) and float(lin.betas[-1]) == pytest.approx(2e-2)
    assert float(lin.alphas_cumprod[1]) == pytest.approx((1 - 1e-4) * (1 - (1e-4 + 0.0199 / 99)), rel=1e-6)
    for bad in ({"schedule": "quadratic"}, {"prediction_type": "noise"}, {"num_train_timesteps": 0}):
        with pytest.raises(ValueError):
            DDPMScheduler(**bad)


def test_add_noise_closed_form_and_velocity():
    s = DDPMScheduler()
    x0, noise, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([10, 200])
    z = s.add_noise(x0, noise, t)
    for i in range(2):
        a = _cosine_abar(int(t[i]))
        assert torch.allclose(z[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], atol=1e-6)
    v = s.get_velocity(x0, noise, t)
    a = _cosine_abar(200)
    assert torch.allclose(v[1], math.sqrt(a) * noise[1] - math.sqrt(1 - a) * x0[1], atol=1e-6)
    assert s.add_noise(x0.double(), noise.double(), 7).dtype == torch.float64


def test_ddpm_step_hand_computed_at_t1_and_clean_at_t0():
    s = DDPMScheduler()
    x0, eps = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    a0, a1 = _cosine_abar(0), _cosine_abar(1)
    x1 = s.add_noise(x0, eps, 1)
    out = s.step(eps, 1, x1, generator=torch.Generator().manual_seed(3))
    beta1 = 1 - a1 / a0
    mean = math.sqrt(a0) * beta1 / (1 - a1) * x0 + math.sqrt(1 - beta1) * (1 - a0) / (1 - a1) * x1
    std = math.sqrt((1 - a0) / (1 - a1) * beta1)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(out, mean + std * z, atol=1e-12)
    # t = 0 steps to the clean sample: x0 exactly, no noise
    x_0 = s.add_noise(x0, eps, 0)
    assert torch.allclose(s.step(eps, 0, x_0), x0, atol=1e-12)


def test_strided_ddpm_uses_the_posterior_between_listed_levels():
    s = DDPMScheduler()
    s.set_timesteps(50)
    ts = s.timesteps
    assert ts.dtype == torch.long and len(ts) == 50 and int(ts[0]) == T - 1 and int(ts[-1]) == 0
    assert torch.all(ts[:-1] > ts[1:]) and len(torch.unique(ts)) == 50
    t, t_next = int(ts[5]), int(ts[6])
    a_t, a_p = _cosine_abar(t), _cosine_abar(t_next)
    x0, eps = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    x_t = s.add_noise(x0, eps, t)
    out = s.step(eps, torch.tensor(t), x_t, generator=torch.Generator().manual_seed(0))
    beta = 1 - a_t / a_p
    mean = math.sqrt(a_p) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * x_t
    z = torch.randn(1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(out, mean + math.sqrt((1 - a_p) / (1 - a_t) * beta) * z, atol=1e-12)


def test_ddim_oracle_recovers_x0_and_stays_on_the_forward_trajectory():
    x0 = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    s = DDIMScheduler()
    s.set_timesteps(10)
    ts = s.timesteps
    assert len(ts) == 10 and torch.all(ts[:-1] > ts[1:]) and 0 <= int(ts.min()) and int(ts.max()) == T - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = s.add_noise(x0, noise, int(ts[0]))
    eps = _oracle(x0)
    for i, t in enumerate(ts):
        z = s.step(eps(z, t), t, z)
        if i + 1 < len(ts):  # every intermediate sample is exactly the forward process at the next timestep
            assert torch.allclose(z, s.add_noise(x0, noise, int(ts[i + 1])), atol=1e-9)
    assert torch.allclose(z, x0, atol=1e-9)
    # float32, from pure noise instead of x_T
    x0f, s10 = x0.float(), DDIMScheduler()
    s10.set_timesteps(10)
    z, eps = torch.randn(x0f.shape, generator=torch.Generator().manual_seed(1)), _oracle(x0f)
    for t in s10.timesteps:
        z = s10.step(eps(z, t).float(), t, z)
    assert z.dtype == torch.float32 and torch.allclose(z, x0f, atol=1e-4)


def test_ddim_full_chain_is_the_deterministic_path():
    """n = T, eta = 0: equals a hand-written loop of DDIM's eq. 12 in float64, and is repeatable."""
    s = DDIMScheduler(num_train_timesteps=40)
    s.set_timesteps(40)
    assert torch.equal(s.timesteps, torch.arange(39, -1, -1))
    model = lambda z, t: torch.sin(z * (1 + int(t) / 40))  # any fixed function of (z, t)
    a = s.alphas_cumprod.double()
    z0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z_ref = z0.clone()
    for t in range(39, -1, -1):
        e = model(z_ref, t)
        a_p = a[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (z_ref - (1 - a[t]).sqrt() * e) / a[t].sqrt()
        z_ref = a_p.sqrt() * x0 + (1 - a_p).sqrt() * e
    runs = []
    for _ in range(2):
        z = z0.clone()
        for t in s.timesteps:
            z = s.step(model(z, t), t, z, generator=torch.Generator().manual_seed(int(t)))
        runs.append(z)
    assert torch.equal(runs[0], runs[1]) and torch.allclose(runs[0], z_ref, rtol=1e-6, atol=1e-6)


def test_ddim_eta1_equals_ddpm_posterior():
    ddpm, ddim = DDPMScheduler(), DDIMScheduler(eta=1.0)
    for sch in (ddpm, ddim):
        sch.set_timesteps(25)
    z, e = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    for t in (int(ddpm.timesteps[0]), int(ddpm.timesteps[12])):
        a = ddpm.step(e, t, z, generator=torch.Generator().manual_seed(5))
        b = ddim.step(e, t, z, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(a, b, atol=1e-10)


def test_prediction_types_agree_on_consistent_outputs():
    x0, eps = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t = 120
    outs = []
    for pred in ("epsilon", "sample", "v_prediction"):
        s = DDIMScheduler(prediction_type=pred)
        s.set_timesteps(20)
        z = s.add_noise(x0, eps, t)
        target = {"epsilon": eps, "sample": x0, "v_prediction": s.get_velocity(x0, eps, t)}[pred]
        outs.append(s.step(target, t, z))
    assert torch.allclose(outs[0], outs[1], atol=1e-10) and torch.allclose(outs[0], outs[2], atol=1e-10)


def test_per_sample_timesteps_and_generators():
    s = DDPMScheduler()
    z, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    gens = lambda seeds: [torch.Generator().manual_seed(k) for k in seeds]
    full = s.step(eps, 100, z, generator=gens([1, 2, 3]))
    part = s.step(eps[1:2], 100, z[1:2], generator=gens([2]))
    assert torch.equal(full[1:2], part)
    mixed = s.step(eps, torch.tensor([5, 100, 0]), z, generator=gens([1, 2, 3]))
    for i, t in enumerate((5, 100, 0)):
        assert torch.allclose(mixed[i : i + 1], s.step(eps[i : i + 1], t, z[i : i + 1], generator=gens([i + 1])))
    with pytest.raises(ValueError, match="one generator per sample"):
        s.step(eps, 100, z, generator=gens([1]))


def test_set_timesteps_bounds():
    s = DDPMScheduler(num_train_timesteps=T)
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [T - 1]
    s.set_timesteps(T + 50)  # reduced to T
    assert torch.equal(s.timesteps, torch.arange(T - 1, -1, -1))
    with pytest.raises(ValueError, match="at least one"):
        s.set_timesteps(0)


def test_save_load_round_trip(tmp_path):
    s = DDPMScheduler(num_train_timesteps=120, schedule="linear", beta_end=0.03, prediction_type="v_prediction")
    s.save_pretrained(tmp_path / "sch")
    saved = json.loads((tmp_path / "sch" / "scheduler_config.json").read_text())
    assert saved["_class"] == "DDPMScheduler" and saved["beta_end"] == 0.03
    back = DDPMScheduler.from_pretrained(tmp_path / "sch")
    assert back.config == s.config and torch.equal(back.alphas_cumprod, s.alphas_cumprod)
    ddim = load_scheduler(tmp_path / "sch", "ddim", eta=0.5)
    assert isinstance(ddim, DDIMScheduler) and ddim.eta == 0.5 and torch.equal(ddim.alphas_cumprod, s.alphas_cumprod)
    ddim.save_pretrained(tmp_path / "ddim")
    assert DDIMScheduler.from_pretrained(tmp_path / "ddim").eta == 0.5
    assert DDPMScheduler.from_pretrained(tmp_path / "ddim").config == s.config  # eta dropped for DDPM
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDPMScheduler.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        load_scheduler(tmp_path / "sch", "heun")
    with pytest.raises(ValueError, match="'euler' integrates a rectified-flow model"):  # a DDPM run (tests/test_samplers.py)
        load_scheduler(tmp_path / "sch", "euler")
    assert isinstance(load_scheduler(tmp_path / "sch"), DDPMScheduler)  # as saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_without_host_sync():
    s = DDIMScheduler(eta=0.5)
    s.set_timesteps(10, device="cuda")
    z = torch.randn(2, 3, device="cuda")
    gens = [torch.Generator(device="cuda").manual_seed(k) for k in (0, 1)]
    ddpm, t_dev = DDPMScheduler(), torch.tensor([3, 4], device="cuda")
    s.step(z, s.timesteps[0], z, generator=gens)  # warm the device tables (one copy per device)
    ddpm.add_noise(z, z, t_dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = s.step(z, s.timesteps[1], z, generator=gens)
        noisy = ddpm.add_noise(z, z, t_dev)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.device.type == "cuda" and out.shape == z.shape
    assert torch.allclose(noisy.cpu(), ddpm.add_noise(z.cpu(), z.cpu(), torch.tensor([3, 4])), atol=1e-6)


def test_clip_sample_range_clamps_the_x0_estimate():
    """At t = T - 1 (alpha_bar ~ 3e-8 for the cosine table) a small epsilon error makes x0 explode; with
    ``clip_sample`` the x0 estimate is clamped to +-clip_sample_range and the DDIM step lands at
    sqrt(a_prev) x0_clipped + sqrt(1 - a_prev) eps_consistent (hand-computed)."""
    z = torch.full((1, 2, 2), 0.5, dtype=torch.float64)
    eps = torch.zeros_like(z)  # a wrong epsilon: x0 = z / sqrt(a_T) ~ 3000
    s = DDIMScheduler(clip_sample=True, clip_sample_range=3.0)
    s.set_timesteps(2)  # timesteps T - 1, 0
    t = int(s.timesteps[0])
    a_t, a_prev = s._abar64[t], s._abar64[0]
    x0 = (z / a_t.sqrt()).clamp(-3.0, 3.0)
    assert float(x0.max()) == 3.0
    eps_c = (z - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_c
    assert torch.allclose(s.step(eps, t, z), expected, atol=1e-9)
    unclipped = DDIMScheduler()
    unclipped.set_timesteps(2)
    assert float(unclipped.step(eps, t, z).max()) > 1000  # what the clip prevents
    with pytest.raises(ValueError, match="clip_sample_range"):
        DDIMScheduler(clip_sample=True, clip_sample_range=0.0)


def test_beta_max_clips_the_cosine_table_and_is_saved(tmp_path):
    """beta_max: the release's 0.9999 clips the last cosine beta (1 unclipped) there instead of at 0.999."""
    rel = DDPMScheduler(num_train_timesteps=T, beta_max=0.9999)
    ours = DDPMScheduler(num_train_timesteps=T)
    assert float(rel.betas[-1]) == pytest.approx(0.9999) and float(ours.betas[-1]) == pytest.approx(0.999)
    assert torch.equal(rel.betas[:-1], ours.betas[:-1])  # only the last beta reaches either clip at T = 300
    assert float(rel.alphas_cumprod[-1]) == pytest.approx(float(rel.alphas_cumprod[-2]) * 1e-4, rel=1e-4)
    rel.save_pretrained(tmp_path / "s")
    assert load_scheduler(tmp_path / "s", "ddim").config["beta_max"] == 0.9999
    cfg = json.loads((tmp_path / "s" / "scheduler_config.json").read_text())
    del cfg["beta_max"]  # a run saved before beta_max existed: 0.999
    (tmp_path / "s" / "scheduler_config.json").write_text(json.dumps(cfg))
    assert torch.equal(DDPMScheduler.from_pretrained(tmp_path / "s").betas, ours.betas)
    with pytest.raises(ValueError, match="beta_max"):
        DDPMScheduler(beta_max=1.0)
