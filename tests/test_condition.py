"""ConditionExtractor and encode_mask: sizes, switches, trainable/saved content layers (the release bug)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lad.models.condition import ConditionExtractor, encode_mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on the shared 2-core machine 2 threads ran 15x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StandInEncoder(torch.nn.Module):
    """A stand-in for the VQ-GAN: one strided Conv3d (4, 4, 4) to 8 channels, plus a record of its input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 8, 4, stride=4)

    def encode(self, x):
        self.seen = x
        return self.conv(x)


def test_release_sizes_content_512():
    """8 x 8 x 64 x 64 latent -> two k3 s2 p1 convs -> 1 x 2 x 16 x 16 = 512 (the release's content vector)."""
    ce = ConditionExtractor(latent_channels=8, latent_shape=(8, 64, 64), num_slices=32, use_structure=False)
    assert ce.content_dim == 512 and ce.cond_dim == 512
    out = ce(torch.randn(2, 8, 8, 64, 64), None)
    assert out.shape == (2, 512)
    # conv arithmetic on odd sizes: 5 -> 3 -> 2, 7 -> 4 -> 2, 9 -> 5 -> 3
    odd = ConditionExtractor(latent_shape=(5, 7, 9), use_structure=False)
    assert odd.content_dim == 2 * 2 * 3 and odd(torch.randn(1, 8, 5, 7, 9), None).shape == (1, 12)


@pytest.mark.parametrize("content,structure,structure_dim,expected", [
    (True, True, 192, 512 + 192),   # full (V3)
    (True, False, 192, 512),        # V1 content only
    (False, True, 192, 192),        # V2 structure only, embedded
    (False, True, 0, 32 * 6),       # V2, raw normalised Betti vector
    (True, True, 0, 512 + 192),
])
def test_switches_give_cond_dim(content, structure, structure_dim, expected):
    ce = ConditionExtractor(use_content=content, use_structure=structure, structure_dim=structure_dim, num_slices=32)
    assert ce.cond_dim == expected and ce.null_cond.shape == (expected,)
    lat = torch.randn(1, 8, 8, 64, 64) if content else None
    betti = torch.rand(1, 192) if structure else None
    assert ce(lat, betti).shape == (1, expected)


def test_neither_part_is_an_error():
    with pytest.raises(ValueError, match="content, structure or both"):
        ConditionExtractor(use_content=False, use_structure=False)


def test_raw_structure_passes_the_normalised_vector_through():
    ce = ConditionExtractor(use_content=False, structure_dim=0, num_slices=2)
    betti = torch.from_numpy(np.log1p(np.array([[1, 0, 1, 0, 3, 1, 1, 0, 1, 0, 1, 0]], dtype=np.float32)))
    assert torch.equal(ce(None, betti), betti)


def test_content_layers_are_registered_trained_and_saved(tmp_path):
    """The release re-created the two convs on every call; here they are parameters, get gradients, are saved."""
    torch.manual_seed(0)
    ce = ConditionExtractor(latent_shape=(2, 8, 8), num_slices=8)
    names = dict(ce.named_parameters())
    for key in ("content.0.weight", "content.0.bias", "content.2.weight", "content.2.bias", "null_cond",
                "structure.0.weight", "structure.2.weight"):
        assert key in names and key in ce.state_dict()
    lat = torch.randn(3, 8, 2, 8, 8)
    c1 = ce(lat, torch.rand(3, 48))
    c1[:, : ce.content_dim].square().sum().backward()
    assert ce.content[0].weight.grad.abs().sum() > 0 and ce.content[2].weight.grad.abs().sum() > 0
    # a second call gives the same content (no re-created random layers)
    assert torch.equal(ce(lat, torch.rand(3, 48))[:, : ce.content_dim], c1[:, : ce.content_dim])
    # one optimiser step changes the output
    opt = torch.optim.SGD(ce.parameters(), lr=0.1)
    opt.step()
    moved = ce(lat, torch.rand(3, 48))[:, : ce.content_dim]
    assert not torch.allclose(moved, c1[:, : ce.content_dim])
    with torch.no_grad():
        ce.null_cond.normal_()
    ce.save_pretrained(tmp_path / "cond")
    back = ConditionExtractor.from_pretrained(tmp_path / "cond")
    betti = torch.rand(3, 48)
    assert torch.equal(back(lat, betti), ce(lat, betti))
    assert torch.equal(back.null_cond, ce.null_cond)
    assert back.config["latent_shape"] == [2, 8, 8]


def test_input_validation_messages():
    ce = ConditionExtractor(latent_shape=(2, 8, 8), num_slices=8)
    with pytest.raises(ValueError, match="encoded mask"):
        ce(None, torch.rand(1, 48))
    with pytest.raises(ValueError, match="latent_shape"):
        ce(torch.randn(1, 8, 4, 8, 8), torch.rand(1, 48))
    with pytest.raises(ValueError, match=r"\(B, 48\)"):
        ce(torch.randn(1, 8, 2, 8, 8), torch.rand(1, 47))
    with pytest.raises(ValueError, match="normalised"):
        ce(torch.randn(1, 8, 2, 8, 8), torch.ones(1, 48, dtype=torch.int64))


def test_encode_mask_scales_labels_and_freezes_encoder():
    torch.manual_seed(0)
    enc = StandInEncoder()
    mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.uint8)
    mask[0, 0, :4] = 1
    mask[0, 0, :2, :2] = 2
    z = encode_mask(enc, mask)
    assert z.shape == (2, 8, 2, 2, 2) and not z.requires_grad
    assert sorted(enc.seen.unique().tolist()) == [0.0, 0.5, 1.0]
    assert torch.equal(enc.seen, mask.float() / 2)
    # the latent feeds the extractor; only the extractor's layers receive gradients
    ce = ConditionExtractor(latent_shape=(2, 2, 2), use_structure=False)
    ce(z, None).sum().backward()
    assert enc.conv.weight.grad is None and ce.content[0].weight.grad is not None
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        encode_mask(enc, mask[:, 0])
    with pytest.raises(ValueError, match="integer labels"):
        encode_mask(enc, mask.float())


def test_spatial_condition_is_occupancy_on_the_latent_grid():
    from lad.models.condition import spatial_condition

    mask = torch.zeros((1, 1, 4, 8, 8), dtype=torch.uint8)
    mask[0, 0, :2, :4, :4] = 1  # half of the first 4x4x4 cell's 64 voxels... 32 organ voxels
    mask[0, 0, 0, 0, :4] = 2  # 4 of them tumour
    out = spatial_condition(mask, (4, 4, 4))
    assert out.shape == (1, 2, 1, 2, 2) and out.dtype == torch.float32
    assert out[0, 0, 0, 0, 0].item() == 32 / 64 and out[0, 1, 0, 0, 0].item() == 4 / 64
    assert float(out[..., 1:, :].sum() + out[..., 0, 1:].sum()) == 0.0
    with pytest.raises(ValueError, match="multiple"):
        spatial_condition(mask, (4, 3, 4))
    with pytest.raises(ValueError, match="integer"):
        spatial_condition(mask.float(), (4, 4, 4))
