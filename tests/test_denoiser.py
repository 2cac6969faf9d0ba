"""LatentDenoiser: shapes (every conditioning mode, unconditional, 2D/3D, odd depths), condition use, save/load."""

from __future__ import annotations

import pytest
import torch

from lad.models.denoiser import LatentDenoiser

SMALL = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)
SMALL3 = dict(channels=(8, 16, 16), attention_levels=(False, False, True), num_head_channels=8, norm_num_groups=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on the shared 2-core machine 2 threads ran 15x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_output_layer(d: LatentDenoiser) -> None:
    """MONAI zero-initialises the output conv and each residual block's second conv (the output is 0 and
    ignores t and cond at init); give those weights values so outputs depend on every input."""
    with torch.no_grad():
        for p in d.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.05)


@pytest.mark.parametrize("conditioning", ["embedding", "concat", "cross_attention"])
@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_shapes_both_modes_odd_depths(conditioning, depth):
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=12, conditioning=conditioning, **SMALL3)
    z = torch.randn(2, 8, depth, 6, 8)
    out = d(z, torch.tensor([0, 9]), torch.randn(2, 12))
    assert out.shape == z.shape and out.dtype == torch.float32
    with pytest.raises(ValueError, match="conditional"):
        d(z, torch.tensor([0, 9]), None)
    with pytest.raises(ValueError, match=r"\(B, cond_dim\)"):
        d(z, torch.tensor([0, 9]), torch.randn(2, 11))


def test_padding_rule():
    d = LatentDenoiser(**SMALL3)  # 3 levels: multiples of 4
    assert d.padded_shape((2, 5, 6, 8)) == (4, 8, 8, 8)
    assert d.padded_shape((8, 64, 64)) == (8, 64, 64)
    assert LatentDenoiser(**SMALL).padded_shape((3, 4)) == (4, 4)


def test_unconditional_and_2d():
    d = LatentDenoiser(cond_dim=0, **SMALL)
    assert d(torch.randn(1, 8, 2, 8, 8), torch.tensor([3])).shape == (1, 8, 2, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        d(torch.randn(1, 8, 2, 8, 8), torch.tensor([3]), torch.randn(1, 4))
    for mode in ("embedding", "cross_attention"):
        d2 = LatentDenoiser(spatial_dims=2, cond_dim=4, conditioning=mode, **SMALL)
        assert d2(torch.randn(3, 8, 7, 8), torch.tensor([3, 4, 5]), torch.randn(3, 4)).shape == (3, 8, 7, 8)
    with pytest.raises(ValueError, match="z_t must be"):
        d(torch.randn(1, 4, 2, 8, 8), torch.tensor([3]))


@pytest.mark.parametrize("conditioning", ["embedding", "concat", "cross_attention"])
def test_output_depends_on_condition_and_timestep(conditioning):
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=5, conditioning=conditioning, **SMALL).eval()
    _randomise_output_layer(d)
    z, c = torch.randn(1, 8, 2, 8, 8), torch.randn(1, 5)
    with torch.no_grad():
        base = d(z, torch.tensor([10]), c)
        other_c = d(z, torch.tensor([10]), c + 1.0)
        other_t = d(z, torch.tensor([200]), c)
    assert (base - other_c).abs().max() > 1e-4
    assert (base - other_t).abs().max() > 1e-4


def test_padding_does_not_mix_batch_items_and_crops_exactly():
    """Each item's output is independent of the others (replicate padding is per item, GroupNorm per item)."""
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=3, **SMALL3).eval()
    _randomise_output_layer(d)
    z, t, c = torch.randn(2, 8, 3, 8, 8), torch.tensor([4, 7]), torch.randn(2, 3)
    with torch.no_grad():
        both = d(z, t, c)
        first = d(z[:1], t[:1], c[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-5)


def test_condition_gets_gradients_in_embedding_mode():
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=4, **SMALL)
    _randomise_output_layer(d)
    c = torch.randn(2, 4, requires_grad=True)
    d(torch.randn(2, 8, 2, 8, 8), torch.tensor([1, 2]), c).square().mean().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
    assert d.unet.class_embedding[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("conditioning", ["embedding", "concat", "cross_attention"])
def test_save_load_round_trip(tmp_path, conditioning):
    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=6, conditioning=conditioning, **SMALL).eval()
    _randomise_output_layer(d)
    d.save_pretrained(tmp_path / "den")
    d2 = LatentDenoiser.from_pretrained(tmp_path / "den").eval()
    assert d2.config == d.config
    z, t, c = torch.randn(1, 8, 3, 8, 8), torch.tensor([5]), torch.randn(1, 6)
    with torch.no_grad():
        a, b = d(z, t, c), d2(z, t, c)
    assert a.abs().max() > 0 and torch.equal(a, b)


def test_default_size_is_release_scale():
    """Default (32, 64, 128, 256), 2 blocks per level, 704-d condition: 41.8 M parameters (release pseudo-3D
    UNet: 41.3 M), 4 levels like the release's mults (1, 2, 4, 8); so latents are padded to multiples of 8."""
    d = LatentDenoiser(cond_dim=704)
    n = sum(p.numel() for p in d.parameters())
    assert 41.0e6 < n < 42.5e6
    assert d.config["channels"] == [32, 64, 128, 256] and d.config["num_res_blocks"] == 2
    assert d.padded_shape((8, 64, 64)) == (8, 64, 64) and d.padded_shape((4, 16, 16)) == (8, 16, 16)


def test_bad_configuration_messages():
    with pytest.raises(ValueError, match="conditioning must be"):
        LatentDenoiser(conditioning="film", **SMALL)
    with pytest.raises(ValueError, match="one flag per level"):
        LatentDenoiser(channels=(16, 32), attention_levels=(False,), norm_num_groups=8)


def test_concat_mode_is_the_release_path():
    """conditioning="concat": every residual block's embedding projection sees SiLU([time MLP(t), raw cond])."""
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    torch.manual_seed(0)
    d = LatentDenoiser(cond_dim=5, conditioning="concat", **SMALL).eval()
    width = 4 * SMALL["channels"][0]
    projs = [m.time_emb_proj for m in d.unet.modules() if hasattr(m, "time_emb_proj")]
    assert projs and all(p.in_features == width + 5 for p in projs)
    seen = []
    projs[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    t, c = torch.tensor([10, 99]), torch.randn(2, 5)
    with torch.no_grad():
        d(torch.randn(2, 8, 2, 8, 8), t, c)
        time = d.unet.time_embed.inner(get_timestep_embedding(t, SMALL["channels"][0]))
    torch.testing.assert_close(seen[0], torch.nn.functional.silu(torch.cat([time, c], 1)))


def test_spatial_channels_enter_the_input_and_are_checked():
    d = LatentDenoiser(in_channels=4, out_channels=4, cond_dim=6, spatial_channels=2, **SMALL)
    _randomise_output_layer(d)
    z, t, c = torch.randn(2, 4, 2, 8, 8), torch.tensor([3, 3]), torch.randn(2, 6)
    s = torch.zeros(2, 2, 2, 8, 8)
    s2 = s.clone()
    s2[:, 0, :, :4, :4] = 1.0
    with torch.no_grad():
        a, b = d(z, t, c, s), d(z, t, c, s2)
    assert a.shape == (2, 4, 2, 8, 8) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="spatial condition"):
        d(z, t, c)
    with pytest.raises(ValueError, match="spatial condition"):
        d(z, t, c, torch.zeros(2, 1, 2, 8, 8))
    with pytest.raises(ValueError, match="no spatial condition"):
        LatentDenoiser(in_channels=4, out_channels=4, **SMALL)(z, t, None, s)
