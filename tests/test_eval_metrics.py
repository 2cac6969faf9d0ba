"""Realism, diversity, memorisation and crop metrics against oracles and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg, ndimage

from lad.evaluation.crops import apply_box, max_bounding_box
from lad.evaluation.diversity import ms_ssim_3d, ms_ssim_setup, pairwise_ms_ssim
from lad.evaluation.memorisation import memorisation_report, nearest_distances
from lad.evaluation.realism import fid, mmd, prdc


def _sqrtm_fid(a, b):
    ma, sa, mb, sb = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    return ((ma - mb) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)


# ---------------------------------------------------------------- FID
def test_fid_zero_on_itself_and_monotone_in_shift():
    a = np.random.default_rng(0).normal(size=(200, 8))
    assert fid(a, a).value == pytest.approx(0.0, abs=1e-9)
    vals = [fid(a, a + s).value for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(vals, vals[1:]))
    assert vals[2] == pytest.approx(8.0, rel=1e-9)  # same covariance: FID = |shift|^2 = 8 * 1^2


@pytest.mark.parametrize("na,nb,dim,method", [(200, 150, 8, "eigh"), (30, 25, 40, "nuclear-norm"), (60, 60, 12, "eigh")])
def test_fid_matches_sqrtm_oracle_both_routes(na, nb, dim, method):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(na, dim))
    b = rng.normal(size=(nb, dim)) @ rng.normal(size=(dim, dim)) * 0.5 + 0.3
    r = fid(a, b)
    assert r.details["method"] == method and (r.n_a, r.n_b) == (na, nb)
    assert r.value == pytest.approx(_sqrtm_fid(a, b), rel=1e-6, abs=1e-9)
    assert fid(b, a).value == pytest.approx(r.value, rel=1e-9)


def test_fid_closed_form_for_known_gaussian_moments():
    # Samples whitened to exactly mean mu and covariance S, so FID equals the closed form for N(mu_a, S_a), N(mu_b, S_b)
    def exact(n, mu, cov, seed):
        x = np.random.default_rng(seed).normal(size=(n, len(mu)))
        x -= x.mean(0)
        x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T @ np.linalg.cholesky(cov).T
        return x + mu

    sa, sb = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    a, b = exact(100, np.zeros(3), sa, 1), exact(80, np.array([1.0, 2.0, 0.0]), sb, 2)
    # diagonal covariances: tr(S_a + S_b - 2 sqrt(S_a S_b)) = sum (sqrt(a_i) - sqrt(b_i))^2 = 1 + 1 + 4; |mu|^2 = 5
    assert fid(a, b).value == pytest.approx(11.0, rel=1e-9)


def test_fid_warns_when_n_below_dim(caplog):
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING"):
        fid(rng.normal(size=(10, 20)), rng.normal(size=(12, 20)))
    assert "below the feature dimension 20" in caplog.text
    with pytest.raises(ValueError, match="different feature dimensions"):
        fid(np.zeros((5, 3)), np.zeros((5, 4)))


# ---------------------------------------------------------------- MMD
def test_mmd_hand_computed_three_points():
    a, b = np.array([[0.0], [1.0], [3.0]]), np.array([[0.0], [2.0]])
    k = lambda x, y, s: np.exp(-((x - y) ** 2) / (2 * s * s))  # noqa: E731
    for s in (1.0, 1.5):
        kaa = 2 * (k(0, 1, s) + k(0, 3, s) + k(1, 3, s)) / (3 * 2)
        kbb = 2 * k(0, 2, s) / (2 * 1)
        kab = np.mean([k(x, y, s) for x in (0, 1, 3) for y in (0, 2)])
        assert mmd(a, b, bandwidth=s).value == pytest.approx(kaa + kbb - 2 * kab, rel=1e-12)
    # pooled {0,1,3,0,2}: distances 0,1,1,1,1,2,2,2,3,3 -> median 1.5
    r = mmd(a, b)
    assert r.details["bandwidth"] == pytest.approx(1.5) and r.value == pytest.approx(mmd(a, b, bandwidth=1.5).value)
    assert (r.n_a, r.n_b, r.details["estimator"]) == (3, 2, "unbiased")


def test_mmd_symmetric_near_zero_same_distribution_larger_when_shifted():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(40, 4))
    assert mmd(x, y).value == pytest.approx(mmd(y, x).value, rel=1e-12)
    assert abs(mmd(x, x).value) < 0.05 and abs(mmd(x, y).value) < 0.05
    shifted = [mmd(x, y + s).value for s in (0.5, 1.0, 2.0)]
    assert 0.05 < shifted[0] < shifted[1] < shifted[2]


# ---------------------------------------------------------------- PRDC
def test_prdc_identical_disjoint_and_hand_example():
    x = np.random.default_rng(2).normal(size=(50, 3))
    r = prdc(x, x, k=3)
    assert (r["precision"], r["recall"], r["coverage"]) == (1.0, 1.0, 1.0) and r["density"] >= 1.0
    far = prdc(x, x + 100, k=3)
    assert (far["precision"], far["recall"], far["density"], far["coverage"]) == (0.0, 0.0, 0.0, 0.0)
    # 1-D, k=1: real {0,1,10} -> radii 1,1,9; fake {0.5, 20}: 0.5 inside balls of 0 and 1 (and not 10: |9.5|>9)
    real, fake = np.array([[0.0], [1.0], [10.0]]), np.array([[0.5], [20.0]])
    r = prdc(real, fake, k=1)
    assert r["precision"] == 0.5 and r["density"] == pytest.approx(2 / 2)  # (2 + 0) / 1 / 2 fakes
    assert r["coverage"] == pytest.approx(2 / 3)  # nearest fake of 10 is 0.5 (9.5 > 9)
    assert r["recall"] == 1.0  # fake radii 19.5: every real is within 19.5 of some fake
    with pytest.raises(ValueError, match="k = 5"):
        prdc(real, fake, k=5)


# ---------------------------------------------------------------- MS-SSIM
def _smooth_volume(shape, seed):
    v = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2)
    return ((v - v.min()) / (v.max() - v.min())).astype(np.float32)


@pytest.mark.parametrize("depth", [8, 16, 32])
def test_ms_ssim_identity_noise_and_depths(depth):
    v = _smooth_volume((depth, 48, 48), depth)
    r = ms_ssim_3d(v, v)
    assert r.value == pytest.approx(1.0, abs=1e-5)
    assert r.details["kernel_size"] == (1, 11, 11) and r.details["scales"] == 3  # 48 -> 24 -> 12 >= 11
    rng = np.random.default_rng(0)
    noisy = [np.clip(v + rng.normal(0, s, v.shape), 0, 1).astype(np.float32) for s in (0.02, 0.1, 0.3)]
    vals = [ms_ssim_3d(v, n).value for n in noisy]
    assert 1.0 > vals[0] > vals[1] > vals[2]


def test_ms_ssim_equals_monai_where_they_coincide():
    from monai.metrics.regression import compute_ms_ssim

    a, b = _smooth_volume((8, 40, 40), 1), _smooth_volume((8, 40, 40), 2)
    ours = ms_ssim_3d(a, b, scales=1).value  # one scale: MONAI 3D SSIM with a (1, 11, 11) window
    theirs = compute_ms_ssim(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], 3,
                             kernel_size=(1, 11, 11), kernel_sigma=(1.0, 1.5, 1.5), weights=(1.0,))
    assert ours == pytest.approx(float(theirs), abs=2e-5)
    a2, b2 = _smooth_volume((1, 192, 192), 3), _smooth_volume((1, 192, 192), 3)
    b2 = np.clip(b2 + np.random.default_rng(4).normal(0, 0.1, b2.shape), 0, 1).astype(np.float32)
    r = ms_ssim_3d(a2, b2)  # one slice, 5 standard scales: MONAI's 2D MS-SSIM
    theirs = compute_ms_ssim(torch.from_numpy(a2)[None], torch.from_numpy(b2)[None], 2)
    assert r.details["scales"] == 5 and r.value == pytest.approx(float(theirs), abs=2e-5)


def test_ms_ssim_setup_scales_and_errors():
    s = ms_ssim_setup((32, 256, 256))
    assert s["scales"] == 5 and s["weights"] == pytest.approx([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], abs=1e-12)
    s = ms_ssim_setup((8, 32, 32))  # 32 -> 16 >= 11, 8 < 11: two scales, weights renormalised
    assert s["scales"] == 2 and s["weights"] == pytest.approx([0.0448 / 0.3304, 0.2856 / 0.3304])
    with pytest.raises(ValueError, match="smaller than the 11-voxel window"):
        ms_ssim_setup((8, 10, 64))
    with pytest.raises(ValueError, match="differ in shape"):
        ms_ssim_3d(np.zeros((4, 16, 16)), np.zeros((4, 16, 17)))


def test_pairwise_ms_ssim_distinct_seeded_pairs():
    base = _smooth_volume((4, 24, 24), 0)
    rng = np.random.default_rng(1)
    vols = [np.clip(base + rng.normal(0, 0.05 * i, base.shape), 0, 1).astype(np.float32) for i in range(6)]
    full = pairwise_ms_ssim(vols, n_pairs=100, seed=0)
    assert (full.n_a, full.n_b) == (15, 6)  # all 15 distinct pairs
    expect = np.mean([ms_ssim_3d(vols[i], vols[j]).value for i in range(6) for j in range(i + 1, 6)])
    assert full.value == pytest.approx(expect, abs=1e-6)
    r1, r2 = pairwise_ms_ssim(vols, n_pairs=5, seed=3), pairwise_ms_ssim(vols, n_pairs=5, seed=3, batch_pairs=2)
    assert r1.n_a == 5 and r1.value == pytest.approx(r2.value, abs=1e-6)
    same = pairwise_ms_ssim([base, base.copy(), base.copy()], n_pairs=3)
    assert same.value == pytest.approx(1.0, abs=1e-5) and same.details["std"] < 1e-5


# ---------------------------------------------------------------- localized crop
def test_localized_crop_is_the_union_box_applied_to_both_sets():
    m1, m2, m3 = (np.zeros((4, 10, 10), np.uint8) for _ in range(3))
    m1[1, 2:4, 2:4] = 1
    m2[2, 5:7, 6:8] = 2
    m3[3, 9, 9] = 3  # label 3 is not organ/tumour: ignored
    box = max_bounding_box(iter([m1, m2[None], m3]))  # an iterator works, (1, D, H, W) too
    assert box == (slice(1, 3), slice(2, 7), slice(2, 8))
    real, synth = np.random.default_rng(0).random((4, 10, 10)), torch.rand(2, 1, 4, 10, 10)
    cr, cs = apply_box(real, box), apply_box(synth, box)
    assert cr.shape == (2, 5, 6) and tuple(cs.shape) == (2, 1, 2, 5, 6)
    assert np.array_equal(cr, real[1:3, 2:7, 2:8]) and torch.equal(cs, synth[..., 1:3, 2:7, 2:8])
    with pytest.raises(ValueError, match="no voxel with labels"):
        max_bounding_box([np.zeros((2, 2, 2))])
    with pytest.raises(ValueError, match="differs from the first mask"):
        max_bounding_box([m1, np.zeros((4, 10, 11))])
    with pytest.raises(ValueError, match="does not fit"):
        apply_box(np.zeros((4, 6, 10)), box)


# ---------------------------------------------------------------- memorisation
def test_nearest_distances_exact_and_chunked():
    rng = np.random.default_rng(5)
    q, ref = rng.normal(size=(37, 6)) * 1e3, rng.normal(size=(20, 6)) * 1e3
    q[4] = ref[11]
    d, i = nearest_distances(q, ref, chunk=8)
    brute = np.linalg.norm(q[:, None] - ref[None], axis=2)
    assert np.array_equal(i, brute.argmin(1)) and np.allclose(d, brute.min(1), rtol=1e-12)
    assert d[4] == 0.0 and i[4] == 11  # exact copy: exactly 0 despite the large norms


def test_memorisation_flags_a_training_copy_not_a_heldout_like_sample():
    rng = np.random.default_rng(4)
    train, held = rng.normal(size=(30, 6)), rng.normal(size=(10, 6))
    heldout_like = held[[2]]  # as far from the training set as a real unseen scan: never below the threshold
    synth = np.concatenate([heldout_like, train[3:4] + 1e-9, rng.normal(size=(3, 6))])
    r = memorisation_report(synth, train, held)
    d_held = np.linalg.norm(held[:, None] - train[None], axis=2).min(1)
    assert r["threshold"] == pytest.approx(d_held.min())
    assert 1 in r["flagged"] and 0 not in r["flagged"]
    assert r["closest_pairs"][0]["synthetic"] == 1 and r["closest_pairs"][0]["train"] == 3
    assert r["closest_pairs"][0]["distance"] == pytest.approx(np.sqrt(6) * 1e-9, rel=1e-3)
    d_syn = np.linalg.norm(synth[:, None] - train[None], axis=2).min(1)
    assert r["flagged"] == np.flatnonzero(d_syn < d_held.min()).tolist() and r["n_synthetic"] == 5
