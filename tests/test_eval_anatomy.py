"""The automatic anatomy and realism checks (lad.evaluation.anatomy) and the VQ-GAN reconstruction report,
each against a known answer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lad.data.labels import ORGAN_LABELS, hu_to_unit
from lad.evaluation.anatomy import (AnatomyReference, HUSampler, body_fraction, has_spine_bone, hu_w1, presence_ranges, present,
                                    spine_region, structure_voxels)

SHAPE = (8, 32, 32)


def _labels(counts: dict[str, int]) -> np.ndarray:
    """A label map of SHAPE holding exactly ``counts`` voxels per structure (in consecutive runs)."""
    flat = np.zeros(int(np.prod(SHAPE)), np.uint8)
    at = 0
    for name, n in counts.items():
        flat[at : at + n] = ORGAN_LABELS[name]
        at += n
    return flat.reshape(SHAPE)


def _abdomen(body_radius: float = 12.0, spine_at: tuple[int, int] = (24, 16), bone_hu: float = 500.0) -> np.ndarray:
    """HU (8, 32, 32): air, an elliptic body of 40 HU and a 3 x 3 bone column (the spine) through every slice."""
    _, yy, xx = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[((yy - 16) / body_radius) ** 2 + ((xx - 16) / (body_radius * 1.2)) ** 2 < 1] = 40.0
    y, x = spine_at
    hu[:, y - 1 : y + 2, x - 1 : x + 2] = bone_hu
    return hu


def test_presence_range_is_the_5_95_percentile_rounded_outward():
    counts = [{"liver": v, "kidney": 0, "spleen": 0, "pancreas": 0, "tumor": 0} for v in range(1, 101)]
    r = presence_ranges(counts)
    assert r["liver"] == (5, 96)  # ranks 4.95 -> 5th value, 94.05 -> 96th value
    assert presence_ranges(counts[:6])["liver"] == (1, 6)  # few windows: their minimum and maximum


def test_a_volume_with_the_organ_removed_scores_absent():
    real = [_labels({"liver": 300 + 20 * i, "kidney": 80 + 5 * i, "spleen": 40 + 3 * i, "pancreas": 30, "tumor": 0}) for i in range(5)]
    ranges = presence_ranges([structure_voxels(x) for x in real])
    assert ranges["liver"] == (300, 380) and ranges["tumor"] == (0, 0)
    full = _labels({"liver": 340, "kidney": 90, "spleen": 45, "pancreas": 30})
    assert present(structure_voxels(full), ranges) == {"liver": True, "kidney": True, "spleen": True, "pancreas": True, "tumor": False}
    no_liver = np.where(full == ORGAN_LABELS["liver"], 0, full)
    assert present(structure_voxels(no_liver), ranges)["liver"] is False
    assert present(structure_voxels(no_liver), ranges)["kidney"] is True
    too_big = _labels({"liver": 700, "kidney": 90, "spleen": 45, "pancreas": 30})  # twice the largest real liver
    assert present(structure_voxels(too_big), ranges)["liver"] is False
    # through the reference: 2 of 3 synthetic volumes have a liver; the real windows all pass their own ranges
    hu = [_abdomen() for _ in real]
    ref = AnatomyReference.from_real(hu, real)
    s = ref.summarize([ref.check(_abdomen(), lab) for lab in (full, no_liver, full)])
    assert s["anatomy"]["present_fraction"]["liver"] == pytest.approx(2 / 3)
    assert s["anatomy"]["present_fraction"]["kidney"] == 1.0
    assert s["anatomy"]["mean_liver_kidney_spleen"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    real_s = ref.summarize([ref.check(h, lab) for h, lab in zip(hu, real)])
    assert real_s["anatomy"]["mean_liver_kidney_spleen"] == 1.0 and real_s["anatomy"]["present_fraction"]["tumor"] == 0.0


def test_body_fraction_known_answers():
    half = np.full(SHAPE, -1000.0)
    half[:, :16] = 0.0
    assert body_fraction(half) == pytest.approx(0.5)
    two = half.copy()
    two[:, 20:22] = 0.0  # a separate slab: not part of the largest component
    assert body_fraction(two) == pytest.approx(0.5)
    assert body_fraction(np.full(SHAPE, -1000.0)) == 0.0 and body_fraction(np.zeros(SHAPE)) == 1.0


@pytest.mark.parametrize("value", [-1000.0, -600.0, 0.0, 40.0, 300.0, 400.0])
def test_a_constant_hu_volume_fails_body_and_bone(value):
    real = [_abdomen(r) for r in (11.0, 12.0, 13.0)]
    ref = AnatomyReference.from_real(real)
    c = ref.check(np.full(SHAPE, value, np.float32))
    assert c["body_ok"] is False and c["bone_ok"] is False


def test_body_and_bone_pass_for_a_real_like_volume_and_bone_must_sit_at_the_spine():
    real = [_abdomen(r) for r in (11.0, 12.0, 13.0)]
    ref = AnatomyReference.from_real(real)
    assert ref.body_range == (pytest.approx(body_fraction(real[0])), pytest.approx(body_fraction(real[2])))
    assert ref.bone_min_voxels == 7  # 10 % of the spine core (8 slices x 3 x 3 = 72 voxels), rounded
    d = ref.to_dict()  # the core (rows 23-25, columns 15-17, every slice) dilated by 2 voxels
    assert d["spine_region_box"] == [[0, 8], [21, 28], [13, 20]] and d["spine_region_voxels"] == 8 * 7 * 7
    ok = ref.check(_abdomen(12.5))
    assert ok["body_ok"] and ok["bone_ok"]
    assert ref.check(_abdomen(12.0, spine_at=(7, 16)))["bone_ok"] is False  # bone in front of the body, not at the spine
    assert ref.check(_abdomen(12.0, bone_hu=150.0))["bone_ok"] is False  # no voxel above 200 HU
    assert ref.check(_abdomen(15.0))["body_ok"] is False  # larger than every real body
    # real windows score 1 on both (they set the ceiling)
    s = ref.summarize([ref.check(h) for h in real])
    assert s == {"body_ok_fraction": 1.0, "bone_ok_fraction": 1.0}


def test_spine_region_keeps_bone_seen_in_half_of_the_windows():
    a, b = _abdomen(spine_at=(24, 16)), _abdomen(spine_at=(24, 16))
    c = _abdomen(spine_at=(6, 16))  # one window with bone elsewhere (a rib, say)
    core = spine_region([a, b, c], dilate=0)
    assert core.sum() == 8 * 9 and core[:, 24, 16].all() and not core[:, 6, 16].any()
    assert has_spine_bone(a, core, min_voxels=72) and not has_spine_bone(a, core, min_voxels=73)


def test_w1_identical_is_zero_and_a_50_hu_shift_is_50():
    rng = np.random.default_rng(0)
    x = rng.normal(40, 30, 5000)
    assert hu_w1(x, x) == 0.0
    assert hu_w1(x, x + 50) == pytest.approx(50.0, abs=1e-9)
    assert hu_w1(x, x[::-1].copy()) == 0.0  # order does not matter
    with pytest.raises(ValueError, match="values on both sides"):
        hu_w1(x, np.zeros(0))
    s = HUSampler(per_volume=100, seed=1)
    s.add(x.reshape(50, 100), np.ones((50, 100), bool))
    s.add(x[:10], np.ones(10, bool))
    assert s.values().shape == (110,) and np.isin(s.values(), x.astype(np.float32)).all()


class _OffsetVQGAN(torch.nn.Module):
    """A stand-in VQ-GAN: reconstruction = input + 50 HU; codes 0 and 1 for the two halves of each latent."""

    config = {"num_embeddings": 16}

    def encode(self, x):
        return x

    def quantize(self, z):
        idx = torch.zeros(z.shape[0], 4, dtype=torch.long)
        idx[:, 2:] = 1
        return SimpleNamespace(z_q=z, indices=idx)

    def decode(self, z):
        return z + 50.0 / 1400.0


def test_reconstruction_report_known_answers():
    from lad.evaluation.reconstruction import reconstruction_report

    items = []
    for k in range(3):
        hu = _abdomen()
        hu[hu > 300] = 300.0  # no clipping at 400 after +50
        organs = np.zeros(SHAPE, np.uint8)
        organs[2:6, 10:14, 10:14] = ORGAN_LABELS["liver"]
        hu[organs == ORGAN_LABELS["liver"]] = 60.0
        items.append({"image": hu_to_unit(hu)[None], "organs": organs[None]})
    model = _OffsetVQGAN().train()
    r = reconstruction_report(model, items, batch_size=2)
    assert r["mae_body_hu"] == pytest.approx(50.0, abs=1e-3) and r["bias_body_hu"] == pytest.approx(50.0, abs=1e-3)
    assert r["mae_hu"] == pytest.approx(50.0, abs=1e-3)  # air -1000 -> -950 too
    assert r["organ_mean_hu_error"]["liver"] == pytest.approx(50.0, abs=1e-3) and r["organ_mean_hu_error"]["spleen"] is None
    assert r["codes_used"] == 2 and r["perplexity"] == pytest.approx(2.0) and r["num_embeddings"] == 16 and r["n_windows"] == 3
    assert model.training  # left in the mode it came in


def test_intervals_of_the_anatomy_fractions():
    """Wilson intervals of the proportions (hand values: 16 of 16 -> [0.806, 1]; 8 of 16 -> [0.280, 0.720]) and a
    bootstrap interval of the three-structure mean that contains it and shrinks with N."""
    from lad.evaluation.anatomy import wilson_interval

    lo, hi = wilson_interval(16, 16)
    assert lo == pytest.approx(0.8063, abs=1e-3) and hi == 1.0
    assert wilson_interval(8, 16) == pytest.approx([0.2800, 0.7200], abs=1e-3)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)

    def checks(n):
        rng = np.random.default_rng(0)
        return [{"body_ok": True, "bone_ok": bool(i % 2), "present": {s: bool(rng.random() < 0.7) for s in
                 ("liver", "kidney", "spleen", "pancreas", "tumor")}} for i in range(n)]

    small, big = AnatomyReference.summarize(checks(16), n_boot=300), AnatomyReference.summarize(checks(256), n_boot=300)
    assert small["body_ok_fraction_ci95"] == pytest.approx(wilson_interval(16, 16))
    assert small["bone_ok_fraction_ci95"] == pytest.approx(wilson_interval(8, 16))
    for s in (small, big):
        a = s["anatomy"]
        lo, hi = a["mean_liver_kidney_spleen_ci95"]
        assert lo <= a["mean_liver_kidney_spleen"] <= hi
        assert set(a["present_fraction_ci95"]) == set(a["present_fraction"])
    width = lambda s: np.diff(s["anatomy"]["mean_liver_kidney_spleen_ci95"])[0]
    assert width(big) < 0.5 * width(small)
    assert "anatomy" in AnatomyReference.summarize(checks(4)) and "body_ok_fraction_ci95" not in AnatomyReference.summarize(checks(4))
