"""Few-step sampling: rectified flow (MONAI's convention, exact Euler on a closed-form Gaussian velocity, its
objective lowers a loss, save/load), DPM-Solver++(2M) against DDIM on an exact-epsilon oracle, batched equals
unbatched at the pipeline level for ddim / dpmpp2m / euler, and the refused sampler-objective pairs."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from lad.schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, RectifiedFlowScheduler, check_sampler,
                            load_scheduler, sampling_scheduler)

T = 300
MU, SD = 0.3, 0.5  # the Gaussian data distribution of the oracles: x0 ~ N(MU, SD^2) per element


# ---------------------------------------------------------------------------------------------- oracles
def _gaussian_epsilon(sched):
    """The exact epsilon of x0 ~ N(MU, SD^2) at ``z = sqrt(a) x0 + sqrt(1 - a) eps``:
    E[x0 | z] = MU + sqrt(a) SD^2 (z - sqrt(a) MU) / (a SD^2 + 1 - a), eps = (z - sqrt(a) E[x0 | z]) / sqrt(1 - a)."""
    abar = sched._abar64

    def eps(z, t):
        a = abar[t]
        ex0 = MU + a.sqrt() * SD**2 * (z - a.sqrt() * MU) / (a * SD**2 + 1 - a)
        return (z - a.sqrt() * ex0) / (1 - a).sqrt()

    return eps


def _gaussian_ode_endpoint(z_T, abar):
    """Where the probability-flow ODE takes ``z_T`` (at t = T - 1) for Gaussian data, followed by the samplers' last
    step (the x0 estimate at t = 0): the ODE keeps ``(z_t - sqrt(a) MU) / sqrt(a SD^2 + 1 - a)`` constant."""
    a_T, a_0 = abar[-1], abar[0]
    u = (z_T - a_T.sqrt() * MU) / (a_T * SD**2 + 1 - a_T).sqrt()
    z_0 = a_0.sqrt() * MU + (a_0 * SD**2 + 1 - a_0).sqrt() * u
    return MU + a_0.sqrt() * SD**2 * (z_0 - a_0.sqrt() * MU) / (a_0 * SD**2 + 1 - a_0)


def _gaussian_velocity(z, t):
    """The exact rectified-flow velocity E[x0 - eps | x_s] of x0 ~ N(MU, SD^2) at ``x_s = (1 - s) x0 + s eps``,
    s = (t + 1) / T: with m = 1 - s and V = m^2 SD^2 + s^2, E[x0 | x] = MU + m SD^2 (x - m MU) / V and
    E[eps | x] = s (x - m MU) / V."""
    s = (torch.as_tensor(t).double() + 1) / T
    m = 1 - s
    var = m**2 * SD**2 + s**2
    return MU + m * SD**2 * (z - m * MU) / var - s * (z - m * MU) / var


def _sample(sched, model, z):
    for t in sched.timesteps:
        z = sched.step(model(z, t), t, z)
    return z


# ---------------------------------------------------------------------------------------------- rectified flow
def test_rectified_flow_follows_monai_convention_shifted_by_one():
    """x_s = (1 - s) x0 + s eps with s = (t + 1) / T is MONAI's add_noise at t + 1; the target is x0 - eps; the
    timesteps + 1 are MONAI's set_timesteps grid and every Euler step equals MONAI's step to the next one."""
    from monai.networks.schedulers import RFlowScheduler

    s = RectifiedFlowScheduler(num_train_timesteps=T)
    x0, eps, t = torch.randn(3, 2, 2, 3, 3), torch.randn(3, 2, 2, 3, 3), torch.tensor([0, 149, 299])
    z = s.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        sl = (ti + 1) / T
        torch.testing.assert_close(z[i], (1 - sl) * x0[i] + sl * eps[i])
    assert torch.equal(z[2], eps[2])  # t = T - 1 is pure noise
    monai = RFlowScheduler(num_train_timesteps=T, use_discrete_timesteps=True)
    torch.testing.assert_close(z, monai.add_noise(x0, eps, t + 1))
    assert torch.equal(s.get_velocity(x0, eps, t), x0 - eps)
    for n in (1, 5, 7, 10, 30):
        s.set_timesteps(n)
        monai.set_timesteps(n)
        assert s.timesteps.dtype == torch.long and len(s.timesteps) == n
        assert torch.equal(s.timesteps + 1, monai.timesteps) and int(s.timesteps.min()) >= 0 and int(s.timesteps[0]) == T - 1
        ts = s.timesteps.tolist()
        v = torch.randn(2, 2, 2, 3, 3)
        for ti, nxt in zip(ts, ts[1:] + [-1]):  # MONAI's last step goes to its timestep 0, ours -1 + 1
            torch.testing.assert_close(s.step(v, ti, z[:2]), monai.step(v, ti + 1, z[:2], nxt + 1)[0])
    # a straight path: the exact velocity of a known pair (x0, eps) carries pure noise to x0 in any number of steps
    for n in (1, 3, 10):
        s.set_timesteps(n)
        out = _sample(s, lambda zz, tt: x0.double() - eps.double(), eps.double())
        torch.testing.assert_close(out, x0.double(), rtol=0, atol=1e-12)


def test_euler_on_the_exact_gaussian_velocity_reproduces_mean_and_variance():
    """Driven by the closed-form velocity of x0 ~ N(0.3, 0.5^2), 100 Euler steps from N(0, 1) give the target's mean
    and variance; the error against the exact flow (x0 = MU + SD u for noise u) halves when the steps double."""
    s = RectifiedFlowScheduler(num_train_timesteps=T)
    u = torch.randn(20000, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = {}
    for n in (50, 100):
        s.set_timesteps(n)
        x = _sample(s, _gaussian_velocity, u.clone())
        errs[n] = float((x - (MU + SD * u)).abs().max())
    assert abs(float(x.mean()) - MU) < 0.02 and abs(float(x.var()) / SD**2 - 1) < 0.05
    assert errs[100] < 0.04 and 0.4 < errs[100] / errs[50] < 0.6  # first order
    # per-sample (B,) timesteps, float32 in, float32 out
    s.set_timesteps(10)
    z = torch.randn(2, 1, 2, 2, 2)
    t = torch.tensor([int(s.timesteps[0]), int(s.timesteps[3])])
    out = s.step(z, t, z)
    assert out.dtype == torch.float32
    for i in range(2):
        torch.testing.assert_close(out[i : i + 1], s.step(z[i : i + 1], int(t[i]), z[i : i + 1]))


def test_rectified_flow_objective_target_and_a_tiny_model_lowers_its_loss():
    """The loss sees z_t = (1 - s) z0 + s eps and regresses z0 - eps with the DDPM's t draw; 30 Adam steps of a tiny
    denoiser on a fixed batch (three fixed draws) lower it by a fifth."""
    from lad.models.denoiser import LatentDenoiser
    from lad.models.guidance import diffusion_loss

    sched = RectifiedFlowScheduler(num_train_timesteps=50)
    z0 = torch.randn(4, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.2
    seen = {}

    def probe(z, t, c):
        seen.update(z=z, t=t)
        return torch.zeros_like(z)

    l2, _ = diffusion_loss(probe, sched, z0, None, generator=torch.Generator().manual_seed(7), loss="l2")
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 50, (4,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    s = ((t + 1) / 50).view(-1, 1, 1, 1, 1)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["z"], (1 - s) * z0 + s * noise)
    torch.testing.assert_close(l2, (z0 - noise).square().mean())

    torch.manual_seed(0)
    net = LatentDenoiser(in_channels=2, out_channels=2, channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                         num_head_channels=8, norm_num_groups=4)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_at = lambda k: diffusion_loss(net, sched, z0, None, generator=torch.Generator().manual_seed(k))[0]  # noqa: E731
    with torch.no_grad():
        before = sum(loss_at(k).item() for k in range(3)) / 3
    for i in range(30):
        loss = loss_at(i % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(k).item() for k in range(3)) / 3
    assert after < 0.8 * before, (before, after)


# ---------------------------------------------------------------------------------------------- DPM-Solver++(2M)
def test_dpmpp2m_converges_with_ddim_and_beats_it_at_10_steps():
    """An oracle returning the exact epsilon of Gaussian data: at 300 steps DDIM and DPM-Solver++(2M) reach the ODE's
    closed-form endpoint (and agree); at 10 and 20 steps the second-order solver is closer than DDIM."""
    z_T = torch.linspace(-3, 3, 61, dtype=torch.float64).view(-1, 1)
    ref = _gaussian_ode_endpoint(z_T, DDIMScheduler()._abar64)
    err, out = {}, {}
    for name, cls in (("ddim", DDIMScheduler), ("dpm", DPMSolverMultistepScheduler)):
        for n in (10, 20, 300):
            s = cls(num_train_timesteps=T)
            s.set_timesteps(n)
            out[name, n] = _sample(s, _gaussian_epsilon(s), z_T.clone())
            err[name, n] = float((out[name, n] - ref).abs().max())
    assert err["ddim", 300] < 0.015 and err["dpm", 300] < 1e-3
    assert float((out["ddim", 300] - out["dpm", 300]).abs().max()) < 0.015
    assert err["dpm", 10] < 0.5 * err["ddim", 10], err
    assert err["dpm", 20] < 0.2 * err["ddim", 20], err
    assert err["dpm", 300] < err["dpm", 20] < err["dpm", 10]


def test_dpmpp2m_first_step_is_ddim_history_resets_and_prediction_types_agree():
    s, ddim = DPMSolverMultistepScheduler(), DDIMScheduler()
    for sch in (s, ddim):
        sch.set_timesteps(10)
    eps = _gaussian_epsilon(s)
    z = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = s.timesteps[0]
    torch.testing.assert_close(s.step(eps(z, t0), t0, z), ddim.step(eps(z, t0), t0, z), rtol=0, atol=1e-12)
    s.set_timesteps(10)  # a new trajectory: no history left from the step above
    first = _sample(s, eps, z.clone())
    again = _sample(s, eps, z.clone())  # the history is also cleared after the last step
    assert torch.equal(first, again)
    # the same ODE solution whether the model predicts epsilon, v or x0 (converted to x0 alike)
    for pred in ("v_prediction", "sample"):
        sp = DPMSolverMultistepScheduler(prediction_type=pred)
        sp.set_timesteps(10)
        abar = sp._abar64

        def model(zz, t):
            a, e = abar[t], eps(zz, t)
            x0 = (zz - (1 - a).sqrt() * e) / a.sqrt()
            return a.sqrt() * e - (1 - a).sqrt() * x0 if pred == "v_prediction" else x0

        torch.testing.assert_close(_sample(sp, model, z.clone()), first, rtol=0, atol=1e-9)
    # per-sample generators are accepted and draw nothing; (B,) timesteps stay per sample
    s.set_timesteps(10)
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    a = s.step(eps(z, t0), t0.repeat(3), z, generator=gens)
    assert all(int(torch.randint(0, 1000, (1,), generator=g)) == int(torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(k)))
               for k, g in enumerate(gens))
    torch.testing.assert_close(a, ddim.step(eps(z, t0), t0, z), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- save / load, refusals
def test_save_load_round_trip_of_the_new_schedulers(tmp_path):
    rf = RectifiedFlowScheduler(num_train_timesteps=120)
    rf.save_pretrained(tmp_path / "rf")
    saved = json.loads((tmp_path / "rf" / "scheduler_config.json").read_text(encoding="utf-8"))
    assert saved == {"_class": "RectifiedFlowScheduler", "num_train_timesteps": 120, "prediction_type": "rectified_flow"}
    back = load_scheduler(tmp_path / "rf")
    assert isinstance(back, RectifiedFlowScheduler) and back.config == rf.config
    assert RectifiedFlowScheduler.from_pretrained(tmp_path / "rf").config == rf.config
    euler = load_scheduler(tmp_path / "rf", "euler")
    for sch in (rf, euler):
        sch.set_timesteps(7)
    z, v = torch.randn(2, 1, 2, 2, 2), torch.randn(2, 1, 2, 2, 2)
    assert torch.equal(_sample(rf, lambda zz, tt: v, z), _sample(euler, lambda zz, tt: v, z))
    for sampler in ("ddpm", "ddim", "dpmpp2m"):
        with pytest.raises(ValueError, match=f"sampler '{sampler}' samples models trained with DDPM.*rectified flow: use --sampler euler"):
            load_scheduler(tmp_path / "rf", sampler)
    with pytest.raises(ValueError, match="holds a RectifiedFlowScheduler.*DDPMScheduler cannot load"):
        DDPMScheduler.from_pretrained(tmp_path / "rf")
    ddpm = DDPMScheduler(num_train_timesteps=120, prediction_type="v_prediction", beta_max=0.9999)
    ddpm.save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="holds a DDPMScheduler.*RectifiedFlowScheduler cannot load"):
        RectifiedFlowScheduler.from_pretrained(tmp_path / "ddpm")
    dpm = load_scheduler(tmp_path / "ddpm", "dpmpp2m")
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config == ddpm.config
    assert torch.equal(dpm.alphas_cumprod, ddpm.alphas_cumprod)
    dpm.save_pretrained(tmp_path / "dpm")
    again = load_scheduler(tmp_path / "dpm")
    assert isinstance(again, DPMSolverMultistepScheduler) and again.config == ddpm.config
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scheduler_config.json").write_text(json.dumps({"_class": "HeunScheduler"}), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown scheduler class 'HeunScheduler'"):
        load_scheduler(tmp_path / "bad")


def test_bad_combinations_are_refused_with_clear_errors():
    from lad.cli import build_parser
    from lad.training.config import resolve_train_config

    with pytest.raises(ValueError, match="prediction_type must be 'rectified_flow'"):
        RectifiedFlowScheduler(prediction_type="epsilon")
    with pytest.raises(ValueError, match="num_train_timesteps must be >= 1"):
        RectifiedFlowScheduler(num_train_timesteps=0)
    with pytest.raises(ValueError, match="'euler' integrates a rectified-flow model.*'epsilon' prediction"):
        check_sampler("epsilon", "euler")
    with pytest.raises(ValueError, match="unknown sampler 'heun'; choose one of ddpm, ddim, dpmpp2m, euler"):
        sampling_scheduler(DDPMScheduler().config, "heun")
    check_sampler("v_prediction", "dpmpp2m")
    # a run is refused before training when its own sampling default cannot sample it
    with pytest.raises(ValueError, match="sampling.sampler 'ddim' does not fit diffusion_train.prediction 'rectified_flow'"):
        resolve_train_config("tiny", ["diffusion_train.prediction=rectified_flow"])
    with pytest.raises(ValueError, match="sampling.sampler 'euler' does not fit diffusion_train.prediction 'epsilon'"):
        resolve_train_config("tiny", ["sampling.sampler=euler"])
    cfg = resolve_train_config("tiny", ["diffusion_train.prediction=rectified_flow", "sampling.sampler=euler"])
    assert (cfg.diffusion_train.prediction, cfg.sampling.sampler) == ("rectified_flow", "euler")
    paper = resolve_train_config("paper-abdomenct1k")  # the paper presets are unchanged: epsilon, DDPM-300
    assert (paper.diffusion_train.prediction, paper.sampling.sampler, paper.sampling.steps) == ("epsilon", "ddpm", 300)
    with pytest.raises(ValueError, match="sampler"):
        resolve_train_config("tiny", ["sampling.sampler=heun"])
    parser = build_parser()
    base = ["sample", "--run", "r", "--masks", "m", "--n", "1", "--out", "o"]
    assert parser.parse_args(base + ["--sampler", "dpmpp2m"]).sampler == "dpmpp2m"
    assert parser.parse_args(base + ["--sampler", "euler"]).sampler == "euler"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--sampler", "heun"])


# ---------------------------------------------------------------------------------------------- pipeline level
@pytest.fixture(scope="module")
def rf_run(handmade_prepared, handmade_run, tmp_path_factory):
    """The hand-made run's VQ-GAN with a rectified-flow diffusion model (2 steps, one preview image: Euler)."""
    from lad.training.config import resolve_train_config
    from lad.training.diffusion_trainer import train_diffusion

    run = tmp_path_factory.mktemp("rf") / "run"
    run.mkdir(parents=True)
    shutil.copytree(handmade_run / "vqgan", run / "vqgan")
    cfg = resolve_train_config("tiny", ["diffusion_train.steps=2", "logging.image_every=2", "logging.checkpoint_every=2",
                                        "diffusion_train.prediction=rectified_flow", "sampling.sampler=euler", "sampling.steps=5"])
    train_diffusion(handmade_prepared, run, cfg, progress_bar=False)
    return run


def _masks(prepared, n=3):
    from lad.data.dataset import PreparedDataset

    ds = PreparedDataset(prepared)
    return torch.as_tensor(np.stack([ds[i]["mask"] for i in range(n)]))


def test_rectified_flow_run_trains_saves_and_samples_with_euler_only(rf_run, handmade_run, handmade_prepared, tmp_path):
    from lad.sampling.generate import SampleSettings, generate_samples
    from lad.sampling.pipeline import LadPipeline

    saved = json.loads((rf_run / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    assert saved == {"_class": "RectifiedFlowScheduler", "num_train_timesteps": 50, "prediction_type": "rectified_flow"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(rf_run / "tensorboard" / "diffusion"))
    events.Reload()
    assert "diffusion/samples" in events.Tags()["images"]  # the trainer's preview, drawn with Euler
    pipe = LadPipeline.from_run(rf_run)
    assert isinstance(pipe.scheduler, RectifiedFlowScheduler)
    masks = _masks(handmade_prepared, 1)
    with pytest.raises(ValueError, match="sampler 'ddim' samples models trained with DDPM.*use --sampler euler"):
        pipe(masks, seeds=[0], sampler="ddim", steps=3)
    with pytest.raises(ValueError, match="'euler' integrates a rectified-flow model"):
        LadPipeline.from_run(handmade_run)(masks, seeds=[0], sampler="euler", steps=3)
    # lad sample: the run's default (euler, 5 steps) works; another sampler is refused before the folder exists
    s = generate_samples(rf_run, handmade_prepared, tmp_path / "s", SampleSettings(n=1))
    rec = json.loads((tmp_path / "s" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert s["written"] == 1 and (rec["sampler"], rec["steps"]) == ("euler", 5)
    with pytest.raises(ValueError, match="sampler 'dpmpp2m' samples models trained with DDPM"):
        generate_samples(rf_run, handmade_prepared, tmp_path / "t", SampleSettings(n=1, sampler="dpmpp2m"))
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m", "euler"])
def test_batched_sampling_equals_unbatched(sampler, rf_run, handmade_run, handmade_prepared):
    """Each sample depends only on its own seed: a batch of 3 equals the 3 samples drawn one by one (and a
    different seed gives a different sample)."""
    from lad.sampling.pipeline import LadPipeline

    pipe = LadPipeline.from_run(rf_run if sampler == "euler" else handmade_run)
    masks = _masks(handmade_prepared, 3)
    seeds = [11, 12, 13]
    batched = pipe(masks, seeds=seeds, sampler=sampler, steps=5, guidance=1.0)
    for i, seed in enumerate(seeds):
        one = pipe(masks[i : i + 1], seeds=[seed], sampler=sampler, steps=5, guidance=1.0)
        torch.testing.assert_close(batched[i : i + 1], one, rtol=0, atol=1e-5)
    other = pipe(masks[:1], seeds=[99], sampler=sampler, steps=5, guidance=1.0)
    assert float((other - batched[:1]).abs().max()) > 1e-3
    assert math.isfinite(float(batched.sum())) and batched.shape == (3, 1, 8, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_new_steps_stay_on_the_device_without_host_sync():
    """DPM-Solver++(2M) (a second-order step) and the Euler step and add_noise of rectified flow read no device
    value on the host; their results equal the CPU's."""
    dpm, rf = DPMSolverMultistepScheduler(), RectifiedFlowScheduler()
    z = torch.randn(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    zc, t_dev = z.cuda(), torch.tensor([3, 4], device="cuda")
    for s in (dpm, rf):
        s.set_timesteps(10, device="cuda")
        s.step(zc, s.timesteps[0], zc)  # warm the device tables (the DPM history now holds one step)
    rf.add_noise(zc, zc, t_dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, b, c = dpm.step(zc, dpm.timesteps[1], zc), rf.step(zc, rf.timesteps[1], zc), rf.add_noise(zc, zc, t_dev)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    dpm_cpu, rf_cpu = DPMSolverMultistepScheduler(), RectifiedFlowScheduler()
    for s in (dpm_cpu, rf_cpu):
        s.set_timesteps(10)
        s.step(z, s.timesteps[0], z)
    torch.testing.assert_close(a.cpu(), dpm_cpu.step(z, dpm_cpu.timesteps[1], z))
    torch.testing.assert_close(b.cpu(), rf_cpu.step(z, rf_cpu.timesteps[1], z))
    torch.testing.assert_close(c.cpu(), rf_cpu.add_noise(z, z, torch.tensor([3, 4])))
