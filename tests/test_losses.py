"""Locality Loss (eq. 2-3) against hand-computed values; hinge and feature-matching terms; VQGANLoss."""

from __future__ import annotations

import pytest
import torch

from lad.models.vqgan import VQGAN
from lad.training.losses import VQGANLoss, feature_matching_loss, hinge_d_loss, hinge_g_loss, locality_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (on the loaded 2-core machine two threads ran 47x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_locality_loss_equals_hand_computed_box_l1():
    x = torch.zeros(1, 1, 4, 6, 6)
    x_hat = torch.zeros(1, 1, 4, 6, 6)
    mask = torch.zeros(1, 1, 4, 6, 6, dtype=torch.uint8)
    mask[0, 0, 1, 1, 1] = 1
    mask[0, 0, 2, 3, 2] = 2  # box: d 1..2, h 1..3, w 1..2 -> 2 * 3 * 2 = 12 voxels
    x_hat[0, 0, 1, 2, 2] = 0.6  # inside the box
    x_hat[0, 0, 3, 5, 5] = 5.0  # outside the box: ignored
    assert locality_loss(x, x_hat, mask).item() == pytest.approx(0.6 / 12)
    # the global L1 differs
    assert (x - x_hat).abs().mean().item() != pytest.approx(0.6 / 12)


def test_empty_masks_contribute_nothing_and_gradient_stays_in_the_box():
    x = torch.zeros(2, 1, 4, 6, 6)
    x_hat = torch.full((2, 1, 4, 6, 6), 0.5, requires_grad=True)
    mask = torch.zeros(2, 1, 4, 6, 6, dtype=torch.uint8)
    loss = locality_loss(x, x_hat, mask)
    assert loss.item() == 0.0
    loss.backward()  # all-empty batch still has a gradient path
    mask[1, 0, 0:2, 0:2, 0:2] = 1
    x_hat.grad = None
    loss = locality_loss(x, x_hat, mask)
    assert loss.item() == pytest.approx(0.5)  # mean over the one non-empty sample only
    loss.backward()
    g = x_hat.grad
    assert g[0].abs().sum() == 0 and g[1, 0, 0:2, 0:2, 0:2].abs().min() > 0 and g[1, 0, 2:].abs().sum() == 0


def test_hinge_and_feature_matching():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    fr = [torch.zeros(2, 3), torch.ones(2, 1)]
    ff = [torch.full((2, 3), 0.5), torch.zeros(2, 1)]
    assert feature_matching_loss(fr, ff).item() == pytest.approx(0.5)  # last (logits) excluded


def test_vqgan_loss_discriminator_terms_switch_on_at_disc_start():
    torch.manual_seed(0)
    m = VQGAN(channels=(8, 16, 16), num_embeddings=32, norm_num_groups=8)
    x = torch.rand(2, 1, 8, 16, 16)
    mask = torch.zeros(2, 1, 8, 16, 16, dtype=torch.uint8)
    mask[:, :, 2:5, 4:10, 4:10] = 1
    crit = VQGANLoss(disc_start=10, disc_channels=8)
    out = m(x)
    _, logs = crit.generator_loss(x, out, mask, step=0)
    assert "g_adv3d" not in logs and logs["locality"] > 0
    d, dlogs = crit.discriminator_loss(x, out, step=0)
    assert d.item() == 0.0
    loss, logs = crit.generator_loss(x, out, mask, step=10)
    assert {"g_adv2d", "g_adv3d", "feature_matching"} <= set(logs)
    expected = 4 * logs["l1"] + logs["commitment"] + logs["locality"] + 0.25 * (logs["g_adv2d"] + logs["g_adv3d"]) + 4 * logs["feature_matching"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    d, _ = crit.discriminator_loss(x, out, step=10)
    assert d.item() > 0
    v0 = VQGANLoss(disc_start=10, disc_channels=8, locality_weight=0.0)
    assert "locality" not in v0.generator_loss(x, out, mask, step=0)[1]
    names = {id(p) for p in crit.discriminator_parameters()}
    assert names == {id(p) for p in [*crit.disc2d.parameters(), *crit.disc3d.parameters()]}
    assert not names & {id(p) for p in m.parameters()}


def test_vqgan_loss_2d_uses_the_whole_image():
    torch.manual_seed(0)
    m = VQGAN(spatial_dims=2, channels=(8, 16), downsample=(2, 2), num_embeddings=16, norm_num_groups=8)
    x = torch.rand(2, 1, 16, 16)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    mask[:, :, 4:8, 4:8] = 2
    crit = VQGANLoss(spatial_dims=2, disc_start=0, disc_channels=8)
    assert crit.disc3d is None
    out = m(x)
    loss, logs = crit.generator_loss(x, out, mask, step=0)
    assert "g_adv3d" not in logs
    expected = 4 * logs["l1"] + logs["commitment"] + logs["locality"] + 0.25 * logs["g_adv2d"] + 4 * logs["feature_matching"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    box = (x - out.recon).abs()[:, :, 4:8, 4:8].mean()
    assert logs["locality"].item() == pytest.approx(box.item(), rel=1e-5)


def test_perceptual_loss_needs_a_real_weights_file(tmp_path):
    from lad.models.perceptual import PerceptualLoss, _vgg16_features

    assert PerceptualLoss.maybe(None) is None
    torch.save({"wrong.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: not a VGG16 state dict"):
        PerceptualLoss(tmp_path / "bad.pth")
    g = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in _vgg16_features("meta").state_dict().items()}
    state = {f"features.{k}": torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    torch.save(state, tmp_path / "vgg.pth")
    p = PerceptualLoss(tmp_path / "vgg.pth")
    assert torch.equal(p.features[0].weight, state["features.0.weight"])  # the file's weights, not an init
    assert not any(q.requires_grad for q in p.parameters())
    a = torch.rand(2, 1, 32, 32, generator=g)
    assert p(a, a).item() == pytest.approx(0.0, abs=1e-6) and p(a, torch.rand(2, 1, 32, 32, generator=g)).item() > 0
    # the same backbone in LPIPS' layout (net.sliceK.N.*, plus its linear heads) loads to the same weights
    slice_of = lambda n: 1 + sum(n > e for e in (3, 8, 15, 22))  # noqa: E731
    lpips = {f"net.slice{slice_of(int(k.split('.')[1]))}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    lpips["lin0.model.1.weight"] = torch.ones(1, 64, 1, 1)
    torch.save(lpips, tmp_path / "lpips.pth")
    assert torch.equal(PerceptualLoss(tmp_path / "lpips.pth").features[28].bias, state["features.28.bias"])
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shape.pth: VGG16 keys with wrong shapes"):
        PerceptualLoss(tmp_path / "shape.pth")


def test_feature_matching_sum_is_the_release_weight():
    """The release sums the per-layer L1 (weight 4 / (n_layers + 1) = 1 for 3 layers); "mean" divides by the count."""
    fr = [torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 1)]
    ff = [torch.ones(1, 2, 3), torch.full((1, 2, 3), 3.0), torch.ones(1, 1)]
    assert feature_matching_loss(fr, ff, "sum").item() == pytest.approx(4.0)
    assert feature_matching_loss(fr, ff, "mean").item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="reduction"):
        feature_matching_loss(fr, ff, "max")
