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
        # every tumour voxel has organ or tumour around it: none sits in background alone
        from scipy import ndimage

        fg = ndimage.binary_closing(out > 0, iterations=1)
        assert not np.any((out == 2) & ~fg)


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
