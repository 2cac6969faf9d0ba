"""Seeded bootstrap 95 % confidence intervals for the evaluation metrics (paper section 4.2 reports
point values only; at a few dozen volumes FID and MMD move a lot between draws, so every number here
comes with an interval over samples).

Method: ``n_boot`` replicates (default 200) resample the synthetic set and, where the metric uses it,
the real set with replacement (independently); features are computed once and only rows are
resampled, so an interval costs milliseconds to seconds. The interval is the bias-corrected
percentile interval ``[q_2.5 - bias, q_97.5 - bias]`` with ``bias = mean(replicates) - value``
(Efron & Tibshirani 1993, ch. 10 and 13): a resample holds duplicates, which lowers its effective
size and inflates FID and the k-NN radii of PRDC, so plain percentiles can lie entirely above the
full-sample value. MMD replicates skip pairs of copies of one volume (a duplicated volume is not a
second sample), with the bandwidth fixed to the full sample's. Intervals of non-negative metrics are
clipped at 0.

Storage convention (``metrics.json``): a metric stored under key ``X`` gets a sibling ``X_ci95`` of the
same structure (a number -> ``[low, high]``, a dict of numbers -> a dict of ``[low, high]``); the
sample count ``n`` sits beside them; ``settings.bootstrap`` records replicates, level, seed and method.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from lad.evaluation.realism import fid, pairwise_sq_dists, prdc

__all__ = ["BOOTSTRAP_METHOD", "ci_from_replicates", "bootstrap_indices", "bootstrap_ci", "mmd_ci", "feature_metric_cis",
           "mean_ci", "add_intervals", "bootstrap_settings"]

BOOTSTRAP_METHOD = "bias-corrected percentile bootstrap over volumes (rows of the feature matrices)"


def ci_from_replicates(replicates: Sequence[float], value: float, level: float = 0.95, *,
                       lower: float | None = None) -> list[float]:
    """``[low, high]`` bias-corrected percentile interval of ``replicates`` around ``value``; NaNs ignored."""
    r = np.asarray(replicates, np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0 or not np.isfinite(value):
        return [float("nan"), float("nan")]
    bias = float(r.mean()) - float(value)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(r, [alpha, 1.0 - alpha]) - bias
    if lower is not None:
        lo, hi = max(lo, lower), max(hi, lower)
    return [float(lo), float(hi)]


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` int64 row indices drawn with replacement."""
    if n < 1:
        raise ValueError(f"bootstrap: need at least one sample, got {n}")
    return rng.integers(0, n, size=(n_boot, n))


def bootstrap_ci(stat: Callable[..., float], arrays: Sequence[np.ndarray], value: float, *, n_boot: int = 200, seed: int = 0,
                 level: float = 0.95, lower: float | None = None) -> list[float]:
    """Interval of ``stat(*resampled arrays)``; each array is resampled along axis 0, independently."""
    rng = np.random.default_rng(seed)
    idx = [bootstrap_indices(len(a), n_boot, rng) for a in arrays]
    reps = [stat(*(np.asarray(a)[i[b]] for a, i in zip(arrays, idx))) for b in range(n_boot)]
    return ci_from_replicates(reps, value, level, lower=lower)


def mean_ci(values: Sequence[float], *, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> list[float]:
    """Interval of the mean of ``values`` (e.g. MS-SSIM of the sampled pairs)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return [float("nan"), float("nan")]
    return bootstrap_ci(lambda x: float(x.mean()), [v], float(v.mean()), n_boot=n_boot, seed=seed, level=level)


def _mmd_from_kernel(k: np.ndarray, ia: np.ndarray, ib: np.ndarray, m: int) -> float:
    """Unbiased MMD^2 from the pooled kernel ``k`` (rows 0..m-1 = set a), excluding pairs of copies of one row."""
    ib = ib + m
    kaa, kbb, kab = k[np.ix_(ia, ia)], k[np.ix_(ib, ib)], k[np.ix_(ia, ib)]
    da, db = ia[:, None] != ia[None], ib[:, None] != ib[None]
    if not da.any() or not db.any():
        return float("nan")
    return float(kaa[da].mean() + kbb[db].mean() - 2.0 * kab.mean())


def mmd_ci(a: np.ndarray, b: np.ndarray, bandwidth: float, value: float, *, n_boot: int = 200, seed: int = 0,
           level: float = 0.95) -> list[float]:
    """Interval of the unbiased Gaussian-kernel MMD^2 (``lad.evaluation.realism.mmd``) at a fixed ``bandwidth``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    pooled = np.concatenate([a, b])
    k = np.exp(-pairwise_sq_dists(pooled, pooled) / (2.0 * bandwidth * bandwidth))
    rng = np.random.default_rng(seed)
    ia, ib = bootstrap_indices(len(a), n_boot, rng), bootstrap_indices(len(b), n_boot, rng)
    return ci_from_replicates([_mmd_from_kernel(k, ia[r], ib[r], len(a)) for r in range(n_boot)], value, level)


def feature_metric_cis(real: np.ndarray, syn: np.ndarray, real_loc: np.ndarray, syn_loc: np.ndarray, entry: dict[str, Any],
                       *, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """``*_ci95`` siblings for the feature-based metrics already in ``entry`` (``fid``, ``mmd``, ``fid_localized``,
    ``mmd_localized``, ``prdc``): one seeded resampling of real and synthetic rows, shared by all of them."""
    rng = np.random.default_rng(seed)
    ir, is_ = bootstrap_indices(len(real), n_boot, rng), bootstrap_indices(len(syn), n_boot, rng)
    out: dict[str, Any] = {}
    for key, fr, fs in (("fid", real, syn), ("fid_localized", real_loc, syn_loc)):
        with _quiet_fid():
            reps = [fid(fr[ir[r]], fs[is_[r]]).value for r in range(n_boot)]
        out[f"{key}_ci95"] = ci_from_replicates(reps, entry[key], level, lower=0.0)
    for key, fr, fs in (("mmd", real, syn), ("mmd_localized", real_loc, syn_loc)):
        bw = entry["mmd_bandwidth"] if key == "mmd" else entry.get("mmd_localized_bandwidth")
        if bw is None:
            continue
        out[f"{key}_ci95"] = mmd_ci(fr, fs, bw, entry[key], n_boot=n_boot, seed=seed, level=level)
    k = entry["prdc"]["k"]
    keys = ("precision", "recall", "density", "coverage")
    reps = {q: [] for q in keys}
    for r in range(n_boot):
        p = prdc(real[ir[r]], syn[is_[r]], k=k)
        for q in keys:
            reps[q].append(p[q])
    out["prdc_ci95"] = {q: ci_from_replicates(reps[q], entry["prdc"][q], level, lower=0.0) for q in keys}
    return out


@contextlib.contextmanager
def _quiet_fid() -> Iterator[None]:
    """FID's small-N warning once per evaluation, not once per replicate."""
    lg = logging.getLogger("lad.evaluation.realism")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def bootstrap_settings(n_boot: int, seed: int, level: float = 0.95) -> dict[str, Any]:
    """What ``metrics.json`` records under ``settings.bootstrap``."""
    return {"replicates": n_boot, "level": level, "seed": seed, "method": BOOTSTRAP_METHOD,
            "convention": "metric X has sibling X_ci95 = [low, high] (dicts: per key); n = samples"}


def add_intervals(entry: dict[str, Any], real: np.ndarray, syn: np.ndarray, real_loc: np.ndarray, syn_loc: np.ndarray, *,
                  ms_ssim_values: Sequence[float], n_boot: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Add every ``*_ci95`` sibling to one synthetic set's ``entry`` of ``metrics.json`` (in place; returned).

    ``real``/``syn``: holistic features ``(N, F)``; ``*_loc``: localized; ``ms_ssim_values``: the per-pair
    MS-SSIM values behind ``entry["ms_ssim"]``. Memorisation gets ``flagged_fraction`` and its interval
    (synthetic volumes resampled, threshold fixed).
    """
    if n_boot < 1:
        return entry
    entry.update(feature_metric_cis(real, syn, real_loc, syn_loc, entry, n_boot=n_boot, seed=seed, level=level))
    entry["ms_ssim_ci95"] = mean_ci(ms_ssim_values, n_boot=n_boot, seed=seed, level=level)
    mem = entry.get("memorisation")
    if mem is not None and mem.get("n_synthetic"):
        flags = np.zeros(mem["n_synthetic"])
        flags[mem["flagged"]] = 1.0
        mem["flagged_fraction"] = float(flags.mean())
        mem["flagged_fraction_ci95"] = [max(0.0, x) for x in mean_ci(flags, n_boot=n_boot, seed=seed, level=level)]
    return entry
