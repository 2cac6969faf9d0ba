"""Denoiser, Condition Extractor and classifier-free guidance (eq. 4)."""

from __future__ import annotations

import pytest
import torch

from lad.models.condition import ConditionExtractor, encode_mask
from lad.models.denoiser import LatentDenoiser
from lad.models.guidance import diffusion_loss, drop_condition, guided_epsilon
from lad.schedulers import DDPMScheduler

SMALL = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)


@pytest.mark.parametrize("conditioning", ["embedding", "cross_attention"])
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_denoiser_shapes(conditioning, depth):
    d = LatentDenoiser(cond_dim=12, conditioning=conditioning, **SMALL)
    z = torch.randn(2, 8, depth, 8, 8)
    assert d(z, torch.tensor([0, 9]), torch.randn(2, 12)).shape == z.shape
    with pytest.raises(ValueError, match="conditional"):
        d(z, torch.tensor([0, 9]), None)


def test_unconditional_and_2d():
    d = LatentDenoiser(cond_dim=0, **SMALL)
    assert d(torch.randn(1, 8, 2, 8, 8), torch.tensor([3])).shape == (1, 8, 2, 8, 8)
    d2 = LatentDenoiser(spatial_dims=2, cond_dim=4, **SMALL)
    assert d2(torch.randn(1, 8, 8, 8), torch.tensor([3]), torch.randn(1, 4)).shape == (1, 8, 8, 8)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=6, **SMALL).eval()
    d.save_pretrained(tmp_path / "den")
    d2 = LatentDenoiser.from_pretrained(tmp_path / "den").eval()
    z, t, c = torch.randn(1, 8, 2, 8, 8), torch.tensor([5]), torch.randn(1, 6)
    assert torch.equal(d(z, t, c), d2(z, t, c))


def test_condition_extractor_content_is_trained_and_saved(tmp_path):
    ce = ConditionExtractor(latent_channels=8, latent_shape=(8, 64, 64), num_slices=32)
    assert ce.content_dim == 512 and ce.cond_dim == 512 + 192  # the release's 704-d condition
    lat = torch.randn(2, 8, 8, 64, 64)
    c = ce(lat, torch.rand(2, 192))
    assert c.shape == (2, 704)
    names = [n for n, _ in ce.named_parameters()]
    assert any(n.startswith("content.") for n in names) and "null_cond" in names
    c.sum().backward()
    assert ce.content[0].weight.grad is not None and ce.content[0].weight.grad.abs().sum() > 0
    ce.save_pretrained(tmp_path / "cond")
    back = ConditionExtractor.from_pretrained(tmp_path / "cond")
    assert torch.equal(back.content[0].weight, ce.content[0].weight)
    assert ConditionExtractor(use_structure=False).cond_dim == 512
    assert ConditionExtractor(use_content=False, num_slices=32).cond_dim == 192
    with pytest.raises(ValueError, match="content, structure or both"):
        ConditionExtractor(use_content=False, use_structure=False)


def test_encode_mask_scales_labels():
    class Probe(torch.nn.Module):
        def encode(self, x):
            self.seen = x
            return x

    p = Probe()
    encode_mask(p, torch.tensor([0, 1, 2], dtype=torch.uint8).view(1, 1, 3, 1, 1))
    assert p.seen.flatten().tolist() == [0.0, 0.5, 1.0]


class Counting(torch.nn.Module):
    """A linear toy denoiser whose conditional and unconditional outputs differ."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, z, t, c):
        self.calls += 1
        return z * 0.5 + c.sum(1).view(-1, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1).float()


def test_guidance_formula_and_single_forward():
    m = Counting()
    z, t = torch.randn(2, 1, 2, 2, 2), torch.tensor([1, 2])
    c, null = torch.randn(2, 3), torch.randn(3)
    eps_c, eps_u = m(z, t, c), m(z, t, null.expand(2, 3))
    m.calls = 0
    assert torch.allclose(guided_epsilon(m, z, t, c, null, 0.0), eps_c)
    out = guided_epsilon(m, z, t, c, null, 1.0)
    assert m.calls == 2 - 1 + 1  # one call for w=0 above, one batched call for w=1
    assert torch.allclose(out, 2 * eps_c - eps_u)
    assert torch.allclose(guided_epsilon(m, z, t, c, null, 2.5), 3.5 * eps_c - 2.5 * eps_u)
    # not the "eps_u + w (eps_c - eps_u)" convention
    assert not torch.allclose(out, eps_c)


def test_drop_condition_frequency_and_seed():
    cond, null = torch.ones(20000, 2), torch.zeros(2)
    out = drop_condition(cond, null, 0.25, generator=torch.Generator().manual_seed(0))
    frac = (out[:, 0] == 0).float().mean().item()
    assert abs(frac - 0.25) < 4 * (0.25 * 0.75 / 20000) ** 0.5
    again = drop_condition(cond, null, 0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_diffusion_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=4, **SMALL)
    sched = DDPMScheduler(num_train_timesteps=50)
    z0, c = torch.randn(2, 8, 2, 8, 8), torch.randn(2, 4)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    losses = []
    for i in range(25):
        loss, _ = diffusion_loss(d, sched, z0, c, generator=torch.Generator().manual_seed(i % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
