"""Evaluation metrics against oracles and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from lad.evaluation.features import FeatureExtractor
from lad.evaluation.metrics import (apply_box, fid, max_bounding_box, memorisation, mmd, ms_ssim_3d, pairwise_ms_ssim, prdc)


def test_fid_zero_for_same_set_grows_with_shift_and_matches_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    assert fid(a, a).value == pytest.approx(0.0, abs=1e-8)
    vals = [fid(a, a + s).value for s in (0.1, 0.5, 1.0)]
    assert vals[0] < vals[1] < vals[2] and vals[2] == pytest.approx(8.0, rel=1e-6)  # |shift|^2 = 8 * 1
    b = rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 0.3
    ma, sa, mb, sb = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    oracle = ((ma - mb) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    r = fid(a, b)
    assert r.value == pytest.approx(oracle, rel=1e-6) and (r.n_a, r.n_b) == (200, 150)


def test_mmd_hand_computed_symmetric_and_shift():
    a = np.array([[0.0], [1.0], [3.0]])
    b = np.array([[0.0], [2.0]])
    r = mmd(a, b, bandwidth=1.0)
    k = lambda x, y: np.exp(-((x - y) ** 2) / 2)
    kaa = (k(0, 1) + k(0, 3) + k(1, 3)) * 2 / 6
    kbb = k(0, 2) * 2 / 2
    kab = np.mean([k(x, y) for x in (0, 1, 3) for y in (0, 2)])
    assert r.value == pytest.approx(kaa + kbb - 2 * kab)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(40, 4))
    assert mmd(x, y).value == pytest.approx(mmd(y, x).value)
    assert abs(mmd(x, y).value) < 0.05 and mmd(x, y + 2).value > 0.3


def test_prdc_identical_sets():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 3))
    r = prdc(x, x, k=3)
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0
    far = prdc(x, x + 100, k=3)
    assert far["precision"] == 0.0 and far["coverage"] == 0.0


def test_ms_ssim_identity_noise_and_depths():
    rng = np.random.default_rng(3)
    for d, hw in ((8, 32), (16, 64), (32, 64)):
        v = np.clip(rng.random((d, hw, hw)) * 0.2 + np.linspace(0, 0.8, hw)[None, None], 0, 1).astype(np.float32)
        r = ms_ssim_3d(v, v)
        assert r.value == pytest.approx(1.0, abs=1e-4) and r.details["kernel_size"] == (1, 11, 11)
        noisy = np.clip(v + rng.normal(0, 0.2, v.shape), 0, 1).astype(np.float32)
        assert ms_ssim_3d(v, noisy).value < 0.95
    p = pairwise_ms_ssim([v, v, noisy], n_pairs=10, seed=0)
    assert p.n_a == 3  # only 3 distinct pairs exist


def test_localized_crop_uses_one_box_for_both_sets():
    m1, m2 = np.zeros((4, 10, 10), np.uint8), np.zeros((4, 10, 10), np.uint8)
    m1[1, 2:4, 2:4] = 1
    m2[2, 5:7, 6:8] = 2
    box = max_bounding_box([m1, m2])
    assert box == (slice(1, 3), slice(2, 7), slice(2, 8))
    real, synth = np.ones((4, 10, 10)), np.zeros((1, 4, 10, 10))
    assert apply_box(real, box).shape == (2, 5, 6) and apply_box(synth, box).shape == (1, 2, 5, 6)
    with pytest.raises(ValueError, match="no organ voxels"):
        max_bounding_box([np.zeros((2, 2, 2))])


def test_memorisation_flags_an_exact_copy():
    rng = np.random.default_rng(4)
    train, held = rng.normal(size=(20, 6)), rng.normal(size=(10, 6))
    synth = np.concatenate([rng.normal(size=(5, 6)), train[3:4]])
    r = memorisation(synth, train, held)
    assert r["flagged"] == [5] and r["closest_pairs"][0] == {"synthetic": 5, "train": 3, "distance": 0.0}


def test_feature_extractor_random_and_medicalnet_file(tmp_path):
    fx = FeatureExtractor.from_spec("random-resnet10")
    assert not fx.is_pretrained and "not MedicalNet" in fx.label
    vols = [np.random.default_rng(i).random((1, 8, 32, 32)).astype(np.float32) for i in range(3)]
    f = fx.extract(vols, batch_size=2, cache_dir=tmp_path / "cache")
    assert f.shape == (3, 512)
    assert np.allclose(FeatureExtractor.from_spec("random-resnet10").extract(vols), f, atol=1e-5)
    assert len(list((tmp_path / "cache").iterdir())) == 3
    assert np.allclose(fx.extract(vols, cache_dir=tmp_path / "cache"), f)
    # an official-layout MedicalNet file (DataParallel prefix + segmentation head) loads
    state = {f"module.{k}": v for k, v in fx.net.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "resnet_10.pth")
    mn = FeatureExtractor.from_spec(f"medicalnet-resnet10:{tmp_path / 'resnet_10.pth'}")
    assert mn.is_pretrained and np.allclose(mn.extract(vols), f, atol=1e-5)
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: not a MedicalNet state dict"):
        FeatureExtractor.from_spec(f"medicalnet-resnet10:{tmp_path / 'bad.pth'}")
    with pytest.raises(ValueError, match="--features"):
        FeatureExtractor.from_spec("inception")
