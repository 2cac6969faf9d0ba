"""Locality Condition Augmentation: replayable, organ-preserving, tumour kept inside its organ."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lad.sampling.augment import AugmentConfig, apply_augmentation, augment_mask, draw_augmentation


def _mask(shape=(8, 48, 48)) -> np.ndarray:
    d, h, w = shape
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    organ = ((yy - 24) / 10.0) ** 2 + ((xx - 20) / 14.0) ** 2 + ((zz - 4) / 4.0) ** 2 < 1
    tumour = ((yy - 24) / 4.0) ** 2 + ((xx - 24) / 4.0) ** 2 + ((zz - 4) / 2.5) ** 2 < 1
    m = np.zeros(shape, np.uint8)
    m[organ] = 1
    m[tumour & organ] = 2
    return m


def test_augmentation_is_replayable_from_its_record():
    mask = _mask()
    cfg = AugmentConfig(elastic_reference_size=48)
    out, rec = augment_mask(mask, cfg, seed=7)
    rec = json.loads(json.dumps(rec))  # the record survives the manifest (JSON)
    assert np.array_equal(apply_augmentation(mask, rec), out)
    out2, rec2 = augment_mask(mask, cfg, seed=7)
    assert np.array_equal(out, out2) and rec == json.loads(json.dumps(rec2))
    out3, _ = augment_mask(mask, cfg, seed=8)
    assert not np.array_equal(out, out3)


def test_augmentation_changes_geometry_but_keeps_labels_and_tumour_inside():
    mask = _mask()
    cfg = AugmentConfig(elastic_reference_size=48)
    for seed in range(6):
        out, _ = augment_mask(mask, cfg, seed=seed)
        assert out.shape == mask.shape and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 1, 2}
        assert (out > 0).sum() >= 0.5 * (mask > 0).sum()
        # every piece of tumour touches organ: none sits in background alone (a closing of out > 0, as
        # before, erodes at the volume's border, where an in-plane rotation can now put tumour)
        from scipy import ndimage

        pieces, n = ndimage.label(out == 2)
        assert all((ndimage.binary_dilation(pieces == i) & (out == 1)).any() for i in range(1, n + 1))


def test_flip_only_mirrors_left_right():
    mask = _mask()
    cfg = AugmentConfig(flip_prob=1.0, rotate_range=(0, 0, 0), scale_range=(0, 0, 0), translate_range=(0, 0, 0), elastic_prob=0.0)
    rec = draw_augmentation(cfg, mask.shape, seed=0)
    assert rec["flip_w"] and rec["elastic"] is None
    assert np.array_equal(apply_augmentation(mask, rec), mask[:, :, ::-1])


def test_none_record_is_identity_and_bad_shape_is_rejected():
    mask = _mask()
    assert np.array_equal(apply_augmentation(mask, {"kind": "none"}), mask)
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        apply_augmentation(mask[0], {"kind": "locality"})


def test_organ_destroying_ranges_raise_after_redraws():
    mask = _mask()
    cfg = AugmentConfig(translate_range=(0.0, 0.0, 5.0), scale_range=(0, 0, 0), elastic_prob=0.0,
                        flip_prob=0.0, rotate_range=(0, 0, 0), max_redraws=2, min_organ_fraction=0.99, on_failure="error")
    # translations of up to 5 widths push the organ out almost always; a translation of exactly 0 is impossible
    with pytest.raises(ValueError, match="removed more than"):
        augment_mask(mask, cfg, seed=0)
    # the default keeps the sample: the mask unaugmented, recorded as such, replayable
    out, rec = augment_mask(mask, dataclasses.replace(cfg, on_failure="identity"), seed=0)
    assert np.array_equal(out, mask) and rec["kind"] == "none" and rec["fallback"] and rec["redraws"] == 3
    assert np.array_equal(apply_augmentation(mask, rec), mask)


def _per_slice(m: np.ndarray) -> np.ndarray:
    return (m > 0).reshape(m.shape[0], -1).sum(1)


def _rotation_only(rotate_range) -> AugmentConfig:
    return AugmentConfig(flip_prob=0.0, rotate_range=rotate_range, scale_range=(0, 0, 0), translate_range=(0, 0, 0),
                         elastic_prob=0.0)


def test_default_rotation_is_axial_and_a_tilt_is_not():
    """The default rotation turns each axial slice in its own plane: every slice keeps its organ voxel count
    (within interpolation error) and no organ voxel moves to another slice; a rotation about H or W tilts."""
    mask = np.zeros((12, 48, 48), np.uint8)
    mask[3:9, 14:34, 10:38] = 1  # a box: a tilt moves organ into slices 0-2 and 9-11, an axial turn cannot
    mask[4:8, 20:28, 20:28] = 2
    cfg = _rotation_only(AugmentConfig().rotate_range)  # today's default range, nothing else
    recs = [draw_augmentation(cfg, mask.shape, seed=seed) for seed in range(4)]
    assert max(abs(r["rotate"][0]) for r in recs) > np.radians(10)  # the draws include real rotations
    for rec in recs:
        out = apply_augmentation(mask, rec)
        assert not (out[:3] > 0).any() and not (out[9:] > 0).any()
        np.testing.assert_allclose(_per_slice(out)[3:9], _per_slice(mask)[3:9], rtol=0.06)
    # the same angle about the W axis (the D-H plane) tilts the box through its slices
    tilt = apply_augmentation(mask, {**draw_augmentation(_rotation_only((0, 0, 0)), mask.shape, 0),
                                     "rotate": [0.0, 0.0, np.radians(15)]})
    assert (tilt[:3] > 0).any() or (tilt[9:] > 0).any()
    assert np.abs(_per_slice(tilt)[3:9] - _per_slice(mask)[3:9]).max() > 0.1 * _per_slice(mask).max()
