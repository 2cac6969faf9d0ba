"""Betti vectors equal the release's gudhi definition (gudhi is the oracle)."""

from __future__ import annotations

import gudhi
import numpy as np
import pytest
import torch
from scipy import ndimage

from lad.topology import betti_vector, betti_vectors, normalize_betti


def gudhi_betti(mask: np.ndarray) -> np.ndarray:
    """The release's computation, slice by slice and label by label."""
    out = []
    for sl in mask:
        for k in (0, 1, 2):
            cells = 1 - (sl == k)
            if sl.shape[0] == sl.shape[1]:  # the release's exact call (square slices, as its 256 x 256)
                cc = gudhi.CubicalComplex(dimensions=list(sl.shape), top_dimensional_cells=cells.ravel().astype(float))
            else:  # `dimensions=` reads the flat cells in Fortran order; the 2D array is the image itself
                cc = gudhi.CubicalComplex(top_dimensional_cells=cells.astype(float))
            pers = cc.persistence()
            out += [sum(1 for dim, _ in pers if dim == 0), sum(1 for dim, _ in pers if dim == 1)]
    return np.array(out, np.int64)


def _random_maps(rng, n):
    for i in range(n):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 18)), int(rng.integers(1, 18)))
        kind = i % 5
        if kind == 0:  # salt and pepper at various densities
            yield rng.choice(3, size=shape, p=rng.dirichlet([1, 1, 1])).astype(np.uint8)
        elif kind == 1:  # smooth blobs of random size, organ with tumour inside
            f = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, *rng.uniform(0.5, 3, 2)))
            lo = rng.uniform(-0.2, 0.2)
            m = np.zeros(shape, np.uint8)
            m[f > lo] = 1
            m[f > lo + rng.uniform(0.05, 0.4)] = 2
            yield m
        elif kind == 2:  # organ only, random density
            yield (rng.random(shape) < rng.uniform(0.1, 0.9)).astype(np.int64)
        elif kind == 3:  # tumour only
            yield ((rng.random(shape) < rng.uniform(0.1, 0.9)) * 2).astype(np.int32)
        else:  # a blob away from the border (the cropping path), holes punched in it
            m = np.zeros(shape, np.uint8)
            d, h, w = shape
            if h > 4 and w > 4:
                m[:, 2 : h - 2, 2 : w - 2] = 1
                m[rng.random(shape) < 0.3] = 0
                m[(rng.random(shape) < 0.1) & (m == 1)] = 2
            yield m


def test_equals_gudhi_on_random_label_maps():
    rng = np.random.default_rng(0)
    for m in _random_maps(rng, 400):
        assert np.array_equal(betti_vector(m), gudhi_betti(m)), m


def _special_cases():
    z = np.zeros((9, 9), np.uint8)
    ring = z.copy()
    ring[1:8, 1:8] = 1
    ring[2:7, 2:7] = 0
    ring[3:6, 3:6] = 1  # island inside the hole
    ring[4, 4] = 2  # tumour inside the island
    nested = np.ones((9, 9), np.uint8)
    nested[1:8, 1:8] = 0
    nested[2:7, 2:7] = 1
    nested[3:6, 3:6] = 0  # ring inside a ring, the outer one on the border
    diag = z.copy()
    diag[2, 2] = diag[3, 3] = diag[4, 2] = 1  # diagonal-only contacts: one 8-component
    checker = (np.indices((5, 5)).sum(0) % 2 == 0).astype(np.uint8)
    corner = z.copy()
    corner[0, 0] = 2
    edge_ring = z.copy()
    edge_ring[0:3, 3:6] = 1
    edge_ring[0, 4] = 0  # a "hole" open to the border: not a hole
    return {"empty": z, "full1": np.ones((9, 9), np.uint8), "full2": np.full((9, 9), 2, np.uint8), "ring": ring,
            "nested": nested, "diag": diag, "checker": checker, "corner": corner, "edge_ring": edge_ring,
            "pixel_1x1": np.ones((1, 1), np.uint8), "row": np.array([[1, 0, 2, 0, 1]], np.uint8)}


def test_special_cases_equal_gudhi_and_hand_counts():
    cases = _special_cases()
    for name, sl in cases.items():
        assert np.array_equal(betti_vector(sl[None]), gudhi_betti(sl[None])), name
    per = lambda name: betti_vector(cases[name][None]).tolist()
    assert per("empty") == [1, 0, 1, 0, 1, 0]  # background fills the slice; absent labels give [1, 0]
    assert per("full1") == [1, 0, 1, 0, 1, 0]
    # ring with an island and a tumour pixel: background = frame + moat (2 components) enclosing the ring
    # and the island (2 holes); organ = ring + island (2 components) with the moat and the tumour as holes
    assert per("ring") == [2, 2, 2, 2, 1, 0]
    assert per("nested") == [2, 1, 2, 2, 1, 0]  # the outer ring touches the border: not a hole of the background
    # diagonal-only organ pixels: one 8-component; for the background each is its own (4-connected) hole
    assert per("diag") == [1, 3, 1, 0, 1, 0]
    # 5 x 5 checkerboard: both colours are one 8-component; interior pixels of the other colour are holes
    assert per("checker") == [1, 5, 1, 4, 1, 0]
    assert per("edge_ring") == [2, 0, 1, 0, 1, 0]  # the notch touches the border: no hole, but its own component
    stack = np.stack([cases[k] for k in ("ring", "nested", "diag", "checker", "empty") if cases[k].shape == (9, 9)])
    assert np.array_equal(betti_vector(stack), gudhi_betti(stack))


def test_realistic_organ_mask_equals_gudhi():
    rng = np.random.default_rng(3)
    f = ndimage.gaussian_filter(rng.normal(size=(4, 64, 64)), sigma=(1, 5, 5))
    m = np.zeros(f.shape, np.uint8)
    m[f > 0.02] = 1
    m[f > 0.045] = 2
    assert (m == 2).any() and (m == 1).any()
    assert np.array_equal(betti_vector(m), gudhi_betti(m))


def test_shapes_batching_validation():
    rng = np.random.default_rng(1)
    masks = rng.choice(3, size=(3, 4, 16, 12)).astype(np.uint8)
    masks[1] = 0  # an empty mask inside a batch
    masks[2, :, 5:9, 4:8] = 2
    vecs = betti_vectors(masks)
    assert vecs.shape == (3, 24) and vecs.dtype == np.int64
    for i in range(3):
        assert np.array_equal(vecs[i], betti_vector(masks[i]))
    assert betti_vectors(masks[:, :0]).shape == (3, 0)
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        betti_vector(masks[0, 0])
    with pytest.raises(ValueError, match=r"\{0, 1, 2\}"):
        betti_vector(masks[0] + 1)
    with pytest.raises(ValueError, match="dtype"):
        betti_vector(masks[0].astype(np.float32))


def test_normalize_betti():
    n = normalize_betti(np.array([0, 1, 20]))
    assert n.dtype == np.float32 and np.allclose(n, [0.0, np.log(2), np.log(21)])
    t = normalize_betti(torch.tensor([[0, 3]]))
    assert t.dtype == torch.float32 and torch.allclose(t, torch.tensor([[0.0, float(np.log(4))]]))
