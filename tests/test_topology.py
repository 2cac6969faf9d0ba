"""Betti vectors equal the release's gudhi definition (gudhi is the oracle)."""

from __future__ import annotations

import gudhi
import numpy as np
import pytest
from scipy import ndimage

from lad.topology import betti_vector, betti_vectors, normalize_betti


def gudhi_betti(mask: np.ndarray) -> np.ndarray:
    """The release's computation, slice by slice."""
    out = []
    for sl in mask:
        for k in (0, 1, 2):
            # the release calls CubicalComplex(dimensions=sl.shape, top_dimensional_cells=1 - (sl == k)) on
            # square 256 x 256 slices; gudhi 3.13 takes the 2D array itself (same complex, any shape)
            cc = gudhi.CubicalComplex(top_dimensional_cells=(1 - (sl == k)).astype(float))
            pers = cc.persistence()
            out += [sum(1 for dim, _ in pers if dim == 0), sum(1 for dim, _ in pers if dim == 1)]
    return np.array(out, np.int64)


def _random_maps(rng, n):
    for i in range(n):
        shape = (int(rng.integers(1, 4)), int(rng.integers(2, 20)), int(rng.integers(2, 20)))
        kind = i % 4
        if kind == 0:  # salt and pepper at various densities
            p = rng.dirichlet([1, 1, 1])
            yield rng.choice(3, size=shape, p=p).astype(np.uint8)
        elif kind == 1:  # smooth blobs
            f = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, 1.5, 1.5))
            m = np.zeros(shape, np.uint8)
            m[f > 0.1] = 1
            m[f > 0.4] = 2
            yield m
        elif kind == 2:  # organ only
            yield (rng.random(shape) < rng.uniform(0.2, 0.8)).astype(np.uint8)
        else:  # tumour only
            yield ((rng.random(shape) < rng.uniform(0.2, 0.8)) * 2).astype(np.uint8)


def test_equals_gudhi_on_random_label_maps():
    rng = np.random.default_rng(0)
    for m in _random_maps(rng, 240):
        assert np.array_equal(betti_vector(m), gudhi_betti(m)), m


def test_special_cases_equal_gudhi():
    cases = []
    z = np.zeros((1, 9, 9), np.uint8)
    cases.append(z.copy())  # empty labels 1, 2
    cases.append(np.ones((1, 9, 9), np.uint8))  # label fills the slice, background absent
    ring = z.copy()
    ring[0, 1:8, 1:8] = 1
    ring[0, 2:7, 2:7] = 0
    ring[0, 3:6, 3:6] = 1  # island inside the hole
    ring[0, 4, 4] = 2  # tumour inside the island
    cases.append(ring)
    nested = z.copy()
    nested[0, 0:9, 0:9] = 1
    nested[0, 1:8, 1:8] = 0
    nested[0, 2:7, 2:7] = 1
    nested[0, 3:6, 3:6] = 0  # rings touching the border
    cases.append(nested)
    diag = z.copy()
    diag[0, 2, 2] = diag[0, 3, 3] = diag[0, 4, 2] = 1  # diagonal-only contacts
    cases.append(diag)
    px = z.copy()
    px[0, 0, 0] = 2  # single tumour pixel in the corner
    cases.append(px)
    cases.append(np.stack([ring[0], nested[0], diag[0]]))
    for m in cases:
        assert np.array_equal(betti_vector(m), gudhi_betti(m))
    # known values: the ring with an island: background has 2 components (outside, the moat) ...
    v = betti_vector(ring).reshape(-1, 6)[0]
    assert list(v) == list(gudhi_betti(ring))
    assert list(betti_vector(z)) == [1, 0, 1, 0, 1, 0]  # absent labels give [1, 0]


def test_shapes_batching_and_normalisation():
    rng = np.random.default_rng(1)
    masks = rng.choice(3, size=(3, 4, 16, 16)).astype(np.uint8)
    vecs = betti_vectors(masks)
    assert vecs.shape == (3, 24) and vecs.dtype == np.int64
    for i in range(3):
        assert np.array_equal(vecs[i], betti_vector(masks[i]))
    n = normalize_betti(np.array([0, 1, 20]))
    assert n.dtype == np.float32 and np.allclose(n, np.log1p([0, 1, 20]))
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        betti_vector(masks[0, 0])
