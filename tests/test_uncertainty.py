"""Bootstrap intervals: seeded, bias-corrected, cover the full-sample value, shrink with N; every metric in
metrics.json gets its `X_ci95` sibling and the report prints `value [low, high]`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lad.evaluation.realism import fid, mmd
from lad.evaluation.uncertainty import _mmd_from_kernel, bootstrap_ci, ci_from_replicates, mean_ci, mmd_ci


def test_bias_correction_recentres_the_percentiles():
    reps = np.arange(100.0) + 10.0  # replicates biased upward by 10 around value 49.5
    lo, hi = ci_from_replicates(reps, 49.5)
    assert lo == pytest.approx(np.quantile(reps, 0.025) - 10) and hi == pytest.approx(np.quantile(reps, 0.975) - 10)
    assert ci_from_replicates([np.nan, np.nan], 1.0) != ci_from_replicates([np.nan, np.nan], 1.0)  # NaN pair, no crash
    assert ci_from_replicates(reps, 5.0, lower=0.0)[0] >= 0.0


def test_mmd_replicate_without_duplicates_is_the_estimator():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 4)), rng.normal(0.5, 1, size=(9, 4))
    r = mmd(a, b)
    pooled = np.concatenate([a, b])
    k = np.exp(-((pooled[:, None] - pooled[None]) ** 2).sum(-1) / (2 * r.details["bandwidth"] ** 2))
    assert _mmd_from_kernel(k, np.arange(7), np.arange(9), 7) == pytest.approx(r.value, abs=1e-12)


def test_intervals_are_seeded_cover_the_value_and_shrink_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 120):
        a, b = rng.normal(size=(n, 8)), rng.normal(0.3, 1, size=(n, 8))
        v = fid(a, b).value
        ci = bootstrap_ci(lambda x, y: fid(x, y).value, [a, b], v, n_boot=100, seed=3)
        assert ci == bootstrap_ci(lambda x, y: fid(x, y).value, [a, b], v, n_boot=100, seed=3)
        assert ci[0] <= v <= ci[1]
        m = mmd(a, b)
        mci = mmd_ci(a, b, m.details["bandwidth"], m.value, n_boot=100, seed=3)
        assert mci[0] <= m.value <= mci[1]
        if n == 120:
            assert mci[0] > 0  # a real difference, enough samples: the interval excludes 0
        widths.append(ci[1] - ci[0])
    assert widths[1] < widths[0]
    lo, hi = mean_ci(np.r_[np.zeros(50), np.ones(50)], n_boot=300, seed=0)
    assert 0.35 < lo < 0.5 < hi < 0.65


def test_evaluate_stores_an_interval_beside_every_metric(tiny_run, tiny_prepared, tmp_path):
    from lad.evaluation.evaluate import evaluate
    from lad.sampling.generate import SampleSettings, generate_samples

    generate_samples(tiny_run, tiny_prepared, tmp_path / "s", SampleSettings(n=4, steps=2, quality_check=False))
    evaluate(tiny_prepared, {"Lad": tmp_path / "s"}, tmp_path / "rep", n_pairs=4, n_boot=30, seed=5)
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    e = m["sets"]["Lad"]
    for k in ("fid", "mmd", "fid_localized", "mmd_localized", "ms_ssim"):
        lo, hi = e[f"{k}_ci95"]
        assert lo <= hi and np.isfinite([lo, hi]).all(), k
    assert set(e["prdc_ci95"]) == {"precision", "recall", "density", "coverage"}
    assert 0 <= e["memorisation"]["flagged_fraction_ci95"][0] <= e["memorisation"]["flagged_fraction_ci95"][1] <= 1
    assert len(m["real"]["ms_ssim_ci95"]) == 2 and m["settings"]["bootstrap"]["replicates"] == 30
    assert m["settings"]["features_kind"] == "untrained"
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    lo, hi = e["fid_ci95"]
    assert f"{e['fid']:.4g} [{lo:.4g}, {hi:.4g}]" in html and "Untrained features" in html
    evaluate(tiny_prepared, {"Lad": tmp_path / "s"}, tmp_path / "rep2", n_pairs=4, n_boot=30, seed=5)
    assert json.loads((tmp_path / "rep2" / "metrics.json").read_text())["sets"]["Lad"]["fid_ci95"] == e["fid_ci95"]
