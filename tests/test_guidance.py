"""Classifier-free guidance (eq. 4), condition dropping and the diffusion objective."""

from __future__ import annotations

import pytest
import torch

from lad.models.denoiser import LatentDenoiser
from lad.models.guidance import diffusion_loss, drop_condition, guided_epsilon


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on the shared 2-core machine 2 threads ran 15x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Counting(torch.nn.Module):
    """A toy denoiser whose conditional and null predictions differ non-linearly; counts its calls and batch sizes."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []

    def forward(self, z, t, c):
        self.batches.append(z.shape[0])
        shift = c.square().sum(1) if c is not None else torch.zeros(z.shape[0])
        return z * 0.5 + (shift + t.float()).view(-1, *([1] * (z.ndim - 1)))


class StandInScheduler:
    """The two members diffusion_loss uses, with a linear alpha-bar: z_t = sqrt(a) z0 + sqrt(1 - a) eps."""

    num_train_timesteps = 50

    def add_noise(self, x0, noise, t):
        a = (1.0 - (t.float() + 1) / 51).view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def test_guidance_is_eq4_and_one_forward():
    m = Counting()
    z, t = torch.randn(2, 1, 2, 2, 2), torch.tensor([1, 2])
    c, null = torch.randn(2, 3), torch.randn(3)
    eps_c, eps_u = m(z, t, c), m(z, t, null.expand(2, 3))
    assert (eps_c - eps_u).abs().min() > 0  # the two predictions really differ
    m.batches.clear()
    assert torch.equal(guided_epsilon(m, z, t, c, null, 0.0), eps_c)
    assert m.batches == [2]  # w = 0: one plain conditional forward
    m.batches.clear()
    out = guided_epsilon(m, z, t, c, null, 1.0)
    assert m.batches == [4]  # exactly one call, both passes batched
    torch.testing.assert_close(out, 2 * eps_c - eps_u)
    # the other convention eps_u + w (eps_c - eps_u) gives eps_c at w = 1: must not match
    assert not torch.allclose(out, eps_u + 1.0 * (eps_c - eps_u))
    torch.testing.assert_close(guided_epsilon(m, z, t, c, null, 2.5), 3.5 * eps_c - 2.5 * eps_u)
    # hand-computed: z = 0, t = 0, c = [1, 1], null = [0, 0]: eps_c = 2, eps_u = 0 -> w=1 gives 4
    one = guided_epsilon(m, torch.zeros(1, 1, 1, 1, 1), torch.tensor([0]), torch.ones(1, 2), torch.zeros(2), 1.0)
    assert one.item() == 4.0


def test_guidance_unconditional_is_plain_forward():
    m = Counting()
    z, t = torch.randn(3, 1, 2, 2), torch.tensor([4, 5, 6])
    assert torch.equal(guided_epsilon(m, z, t, None, None, 1.0), m(z, t, None))
    assert m.batches == [3, 3]
    with pytest.raises(ValueError, match="null condition"):
        guided_epsilon(m, z, t, torch.randn(3, 2), None, 1.0)


def test_guidance_with_the_real_denoiser_matches_two_forwards():
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8).eval()
    with torch.no_grad():
        for p in d.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.05)
        z, t, c, null = torch.randn(2, 8, 2, 4, 4), torch.tensor([3, 30]), torch.randn(2, 4), torch.randn(4)
        eps_c, eps_u = d(z, t, c), d(z, t, null.expand(2, 4))
        out = guided_epsilon(d, z, t, c, null, 1.0)
    assert (eps_c - eps_u).abs().max() > 1e-4
    torch.testing.assert_close(out, 2 * eps_c - eps_u, rtol=1e-4, atol=1e-5)


def test_drop_condition_frequency_and_seed():
    n = 20000
    cond, null = torch.ones(n, 2), torch.zeros(2)
    out = drop_condition(cond, null, 0.25, generator=torch.Generator().manual_seed(0))
    dropped = out[:, 0] == 0
    assert torch.equal(out[dropped], torch.zeros(int(dropped.sum()), 2)) and torch.equal(out[~dropped], cond[~dropped])
    assert abs(dropped.float().mean().item() - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5  # 4 binomial sigmas
    again = drop_condition(cond, null, 0.25, generator=torch.Generator().manual_seed(0))
    other = drop_condition(cond, null, 0.25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert torch.equal(drop_condition(cond[:5], null, 0.0, torch.Generator().manual_seed(0)), cond[:5])
    assert torch.equal(drop_condition(cond[:5], null, 1.0, torch.Generator().manual_seed(0)), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="p_uncond"):
        drop_condition(cond, null, 1.5)


def test_drop_condition_passes_gradients_to_null_cond():
    null = torch.zeros(3, requires_grad=True)
    cond = torch.ones(8, 3, requires_grad=True)
    out = drop_condition(cond, null, 0.5, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    n_dropped = int((out[:, 0] == 0).sum())
    assert 0 < n_dropped < 8
    assert torch.equal(null.grad, torch.full((3,), float(n_dropped)))
    assert cond.grad.sum().item() == 3 * (8 - n_dropped)


def test_diffusion_loss_is_l1_of_the_drawn_noise():
    """With a denoiser returning 0 the L1 loss is mean|eps| and L2 mean eps^2 for the same seeded draw."""
    sched, z0 = StandInScheduler(), torch.randn(4, 2, 3, 3, 3)
    zero = lambda z, t, c: torch.zeros_like(z)  # noqa: E731
    l1, logs = diffusion_loss(zero, sched, z0, None, generator=torch.Generator().manual_seed(7))
    l2, _ = diffusion_loss(zero, sched, z0, None, generator=torch.Generator().manual_seed(7), loss="l2")
    g = torch.Generator().manual_seed(7)
    torch.randint(0, 50, (4,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    torch.testing.assert_close(l1, noise.abs().mean())
    torch.testing.assert_close(l2, noise.square().mean())
    assert logs["diffusion"].item() == l1.item()
    with pytest.raises(ValueError, match="l1"):
        diffusion_loss(zero, sched, z0, None, loss="huber")


def test_diffusion_loss_feeds_add_noise_and_timesteps_in_range():
    seen = {}

    def probe(z_t, t, c):
        seen.update(z_t=z_t, t=t, c=c)
        return torch.zeros_like(z_t)

    sched, z0, c = StandInScheduler(), torch.randn(64, 1, 2, 2), torch.randn(64, 3)
    diffusion_loss(probe, sched, z0, c, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 50, (64,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    assert torch.equal(seen["t"], t) and seen["t"].dtype == torch.long
    assert 0 <= int(t.min()) and int(t.max()) < 50
    torch.testing.assert_close(seen["z_t"], sched.add_noise(z0, noise, t))
    assert seen["c"] is c


def test_adam_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)
    sched = StandInScheduler()
    z0, c = torch.randn(2, 8, 2, 4, 4), torch.randn(2, 4)
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)

    def loss_at(seed):
        return diffusion_loss(d, sched, z0, c, generator=torch.Generator().manual_seed(seed))[0]

    with torch.no_grad():
        before = sum(loss_at(s).item() for s in range(3)) / 3
    for i in range(15):
        loss = loss_at(i % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(s).item() for s in range(3)) / 3
    assert after < 0.8 * before


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_diffusion_loss_target_follows_the_prediction_type(prediction):
    """v-prediction's target is sqrt(a_t) eps - sqrt(1 - a_t) z0 and x0-prediction's is z0, for the same draws."""
    from lad.schedulers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=50, prediction_type=prediction)
    z0 = torch.randn(4, 2, 3, 3, 3)
    zero = lambda z, t, c: torch.zeros_like(z)  # noqa: E731
    l2, _ = diffusion_loss(zero, sched, z0, None, generator=torch.Generator().manual_seed(7), loss="l2")
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 50, (4,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    target = a.sqrt() * noise - (1 - a).sqrt() * z0 if prediction == "v_prediction" else z0
    torch.testing.assert_close(l2, target.square().mean())


def test_spatial_condition_is_guided_and_dropped_with_the_vector():
    """The null half of a guided batch gets a zero map; dropout zeroes the map on exactly the rows whose vector it drops."""
    seen = {}

    def probe(z, t, c, s):
        seen["s"] = s.clone()
        return z * 0 + s.sum(dim=1, keepdim=True)

    z, t = torch.zeros(2, 1, 1, 2, 2), torch.tensor([0, 0])
    c, null, s = torch.ones(2, 3), torch.zeros(3), torch.rand(2, 2, 1, 2, 2) + 0.1
    out = guided_epsilon(probe, z, t, c, null, 2.0, spatial=s)
    assert torch.equal(seen["s"][:2], s) and float(seen["s"][2:].abs().sum()) == 0.0
    torch.testing.assert_close(out, 3.0 * s.sum(dim=1, keepdim=True))
    cond = torch.ones(64, 3)
    dropped, sp = drop_condition(cond, null, 0.5, torch.Generator().manual_seed(0), spatial=torch.ones(64, 2, 1, 2, 2))
    rows = dropped.sum(dim=1) == 0
    assert 0 < int(rows.sum()) < 64
    assert torch.equal(sp.flatten(1).sum(dim=1) == 0, rows)
    assert torch.equal(drop_condition(cond, null, 0.5, torch.Generator().manual_seed(0)), dropped)
