"""VQ-GAN, EMA codebook and discriminators: shapes, oracle nearest codes, EMA arithmetic, save/load."""

from __future__ import annotations

import pytest
import torch

from lad.models.discriminator import PatchDiscriminator
from lad.models.quantizer import EMAQuantizer, nearest_codes
from lad.models.vqgan import VQGAN

TINY = dict(channels=(8, 16, 16), num_embeddings=64, norm_num_groups=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (on the loaded 2-core machine two threads ran 47x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("spatial_dims,shape,down", [(3, (8, 16, 16), (4, 4, 4)), (3, (8, 16, 16), (2, 4, 4)), (2, (16, 16), (4, 4))])
def test_shapes(spatial_dims, shape, down):
    torch.manual_seed(0)
    m = VQGAN(spatial_dims=spatial_dims, downsample=down, **TINY)
    x = torch.rand(2, 1, *shape)
    out = m(x)
    assert out.recon.shape == x.shape
    assert out.z_e.shape == (2, 8, *(s // f for s, f in zip(shape, down)))
    assert out.indices.shape == (2, *(s // f for s, f in zip(shape, down)))
    assert m.latent_shape(shape) == (8, *(s // f for s, f in zip(shape, down)))
    with pytest.raises(ValueError, match="not divisible"):
        m.latent_shape(tuple(s + 1 for s in shape))


def test_nearest_codes_equals_brute_force_and_chunking(monkeypatch):
    g = torch.Generator().manual_seed(0)
    flat, book = torch.randn(500, 8, generator=g), torch.randn(37, 8, generator=g)
    oracle = torch.cdist(flat, book).argmin(1)
    assert torch.equal(nearest_codes(flat, book), oracle)
    import lad.models.quantizer as q

    monkeypatch.setattr(q, "_MAX_DISTANCES", 37 * 7)  # 7 rows per chunk
    assert torch.equal(nearest_codes(flat, book), oracle)


def test_ema_update_matches_hand_computation():
    q = EMAQuantizer(num_embeddings=2, embedding_dim=1, decay=0.5, epsilon=0.0, restart_dead_codes=False)
    q.embedding.copy_(torch.tensor([[0.0], [10.0]]))
    q.embed_sum.copy_(torch.tensor([[0.0], [10.0]]))
    q.cluster_size.fill_(1.0)
    q.initialized.fill_(True)
    z = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 3)  # (B=1, C=1, S=3): two vectors to code 0, one to code 1
    out = q(z)
    assert out.indices.tolist() == [[0, 0, 1]]
    # cluster_size = 0.5*1 + 0.5*[2, 1] = [1.5, 1.0]; embed_sum = 0.5*[0, 10] + 0.5*[3, 9] = [1.5, 9.5]
    assert torch.allclose(q.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(q.embedding.view(-1), torch.tensor([1.0, 9.5]))
    # commitment = 0.25 * mean((z - z_q)^2) with z_q the codes before the update
    assert out.commitment_loss.item() == pytest.approx(0.25 * (1 + 4 + 1) / 3)
    assert out.perplexity.item() == pytest.approx(torch.exp(-(torch.tensor([2 / 3, 1 / 3]) * torch.log(torch.tensor([2 / 3, 1 / 3]))).sum()).item())


def test_data_init_restart_and_uniform_perplexity():
    torch.manual_seed(0)
    q = EMAQuantizer(num_embeddings=4, embedding_dim=2, dead_code_threshold=0.5, decay=1.0)  # codes do not move
    z = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]).t().reshape(1, 2, 4)
    q(z)  # data init: every code is one of the inputs
    rows = {tuple(r) for r in z.reshape(2, 4).t().tolist()}
    assert all(tuple(c) in rows for c in q.embedding.tolist())
    q.eval()
    q.embedding.copy_(z.reshape(2, 4).t())
    out = q(z)
    assert out.perplexity.item() == pytest.approx(4.0, rel=1e-4) and out.usage.item() == 1.0
    # dead-code restart replaces only the codes whose EMA usage fell below the threshold
    q.train()
    q.cluster_size.copy_(torch.tensor([5.0, 5.0, 5.0, 0.0]))
    far = torch.tensor([[100.0, 100.0]]).t().reshape(1, 2, 1)
    before = q.embedding.clone()
    q.cluster_size[:3] = 50.0
    q(far)
    changed = (q.embedding != before).any(1)
    assert changed[3] and torch.allclose(q.embedding[3], torch.tensor([100.0, 100.0]))


def test_save_load_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    m = VQGAN(**TINY)
    m.train()
    m(torch.rand(2, 1, 8, 16, 16))  # data-init the codebook
    m.eval()
    m.save_pretrained(tmp_path / "vq")
    m2 = VQGAN.from_pretrained(tmp_path / "vq").eval()
    assert m2.config == m.config and bool(m2.quantizer.initialized)
    x = torch.rand(1, 1, 8, 16, 16)
    a, b = m(x), m2(x)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.indices, b.indices)
    assert torch.equal(m.decode_latent(a.z_e), b.recon)


def test_training_steps_reduce_reconstruction_loss():
    torch.manual_seed(0)
    m = VQGAN(channels=(8, 16), downsample=(2, 2, 2), num_embeddings=64, norm_num_groups=8)
    x = torch.rand(2, 1, 8, 16, 16)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = m(x)
        loss = (out.recon - x).abs().mean() + out.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("spatial_dims,shape", [(2, (32, 32)), (3, (8, 16, 16)), (3, (16, 32, 32))])
def test_discriminator_features(spatial_dims, shape):
    d = PatchDiscriminator(spatial_dims=spatial_dims, channels=8, num_layers=3)
    feats = d(torch.rand(2, 1, *shape))
    assert len(feats) == 5 and feats[-1].shape[:2] == (2, 1) and all(s >= 1 for s in feats[-1].shape[2:])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = VQGAN(**TINY, num_res_blocks=2)
    m(torch.rand(2, 1, 8, 16, 16))  # data init
    m.quantizer.eval()  # the codebook stays fixed between the two passes
    x = torch.rand(2, 1, 8, 16, 16)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m.checkpoint_min_bytes = 0  # checkpoint even this tiny input
        out = m(x)
        (out.recon.square().mean() + out.commitment_loss).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_quantizer_has_no_host_reads_per_step_and_reinitialises_after_a_reset():
    """After the first training forward, the quantiser reads nothing back to the host (no item/bool,
    no bincount: both are host-device syncs on a GPU); a reset `initialized` buffer (a skipped step
    restoring buffers, a loaded state) is noticed and the codebook is data-initialised again."""
    from torch.profiler import profile

    from lad.models.quantizer import EMAQuantizer

    torch.manual_seed(0)
    q = EMAQuantizer(num_embeddings=16, embedding_dim=4).train()
    z = torch.randn(2, 4, 3, 3, 3)
    q(z)
    with profile() as prof:
        out = q(z)
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::_local_scalar_dense", "aten::bincount", "aten::nonzero"}
    probs = torch.bincount(out.indices.flatten(), minlength=16).float() / out.indices.numel()
    assert torch.allclose(out.perplexity, torch.exp(-(probs * torch.log(probs + 1e-10)).sum()))
    q.initialized.fill_(False)
    q.embedding.zero_()
    q(z)
    assert bool(q.initialized) and q.embedding.abs().sum() > 0
    state = {k: v.clone() for k, v in q.state_dict().items()}
    state["initialized"] = torch.tensor(False)
    q.load_state_dict(state)
    assert not q._is_initialized()


def test_release_architecture_matches_the_public_release_sizes():
    """The paper presets' autoencoder and discriminators have the public release's parameter counts
    (encoder 0.44 M, decoder 0.95 M, 2D PatchGAN 2.76 M, 3D PatchGAN 11.05 M) and its shapes."""
    m = VQGAN(channels=(16, 32, 64), downsample=(4, 4, 4), num_embeddings=64, norm_num_groups=32, architecture="release")
    enc = sum(p.numel() for p in m.encoder.parameters())
    dec = sum(p.numel() for p in m.decoder.parameters())
    assert round(enc / 1e6, 2) == 0.44 and round(dec / 1e6, 2) == 0.95
    assert sum(isinstance(x, torch.nn.ConvTranspose3d) for x in m.decoder.modules()) == 2
    strided = [x for x in m.encoder.modules() if isinstance(x, torch.nn.Conv3d) and x.stride != (1, 1, 1)]
    assert [c.kernel_size for c in strided] == [(4, 4, 4)] * 2
    out = m(torch.rand(2, 1, 16, 32, 32))
    assert out.recon.shape == (2, 1, 16, 32, 32) and out.z_e.shape == (2, 8, 4, 8, 8)
    # anisotropic compression: the depth axis is not halved in the second stage
    m2 = VQGAN(channels=(8, 16, 16), downsample=(2, 4, 4), num_embeddings=16, architecture="release")
    assert m2(torch.rand(1, 1, 8, 16, 16)).recon.shape == (1, 1, 8, 16, 16)
    assert m2.latent_shape((8, 16, 16)) == (8, 4, 4, 4)
    d2 = PatchDiscriminator(spatial_dims=2, channels=64, num_layers=3, kernel_size=4)
    d3 = PatchDiscriminator(spatial_dims=3, channels=64, num_layers=3, kernel_size=4)
    assert sum(p.numel() for p in d2.parameters()) == 2_763_585
    assert round(sum(p.numel() for p in d3.parameters()) / 1e6, 2) == 11.05


def test_release_architecture_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = VQGAN(channels=(8, 16), downsample=(2, 2, 2), num_embeddings=16, architecture="release")
    m.checkpoint_min_bytes = 0
    x = torch.rand(2, 1, 8, 16, 16)
    grads = []
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.zero_grad()
        z = m.encode(x)
        m.decode(z).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.decoder.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_compact_is_the_default_and_unknown_architectures_are_refused():
    assert VQGAN(num_embeddings=8).config["architecture"] == "compact"
    with pytest.raises(ValueError, match="architecture"):
        VQGAN(num_embeddings=8, architecture="tats")
