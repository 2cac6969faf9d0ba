"""Betti-vector extraction: lad.topology vs the release's gudhi computation, on a 32 x 256 x 256 mask.

Prints one JSON line per figure. Run: .venv/bin/python benchmarks/bench_topology.py
"""

from __future__ import annotations

import json
import statistics
import time

import gudhi
import numpy as np
from scipy import ndimage

from lad.topology import betti_vector


def gudhi_betti(mask):
    """The release's call, per slice and label."""
    out = []
    for sl in mask:
        for k in (0, 1, 2):
            cells = (1 - (sl == k)).ravel().astype(float)
            pers = gudhi.CubicalComplex(dimensions=list(sl.shape), top_dimensional_cells=cells).persistence()
            out += [sum(d == 0 for d, _ in pers), sum(d == 1 for d, _ in pers)]
    return np.array(out)


def organ_mask(rng, shape=(32, 256, 256)):
    f = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(2, 8, 8))
    m = np.zeros(shape, np.uint8)
    m[f > 0.02] = 1
    m[f > 0.035] = 2
    return m


def pancreas_mask(shape=(32, 256, 256)):
    """A realistic Lad mask: a phantom pancreas with a tumour, resampled to the paper's window."""
    from lad.data.phantom import generate_subject

    subj = generate_subject(3, tumor=True, spacing=(1.6, 1.6, 2.3), size=(256, 256))
    z = np.flatnonzero((subj.labels == 4).any(axis=(1, 2)))
    z0 = max(0, min(int(z.mean()) - 16, subj.labels.shape[0] - 32))
    org = subj.labels[z0 : z0 + 32]
    m = np.zeros(shape, np.uint8)
    m[org == 4] = 1
    m[org == 5] = 2
    return m


def timed(fn, arg, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(arg)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    for name, mask in (("pancreas_tumour", pancreas_mask()), ("blobs_everywhere", organ_mask(rng)), ("noise", rng.choice(3, size=(32, 256, 256)).astype(np.uint8))):
        assert np.array_equal(betti_vector(mask), gudhi_betti(mask))
        lad_s = timed(betti_vector, mask, 5)
        gudhi_s = timed(gudhi_betti, mask, 1)
        print(json.dumps({"figure": f"betti_32x256x256_{name}", "lad_s": round(lad_s, 4), "gudhi_s": round(gudhi_s, 3),
                          "speedup": round(gudhi_s / lad_s, 1)}))
