"""Do FID / localized FID / MMD see degradations of real CT, with the in-domain features?

A real set (16 phantom windows, tiny preset) is scored against a second real set (16 windows of other
subjects) and against degraded copies of it (`lad.evaluation.sensitivity`). What holds at this size is
asserted; what does not (yet) is the strict-xfail test below, so a change that fixes it is noticed.
"""

from __future__ import annotations

import pytest

from lad.evaluation.sensitivity import DEGRADATIONS, degrade, is_monotonic, sensitivity_table

METRICS = ("fid", "fid_localized", "mmd")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from lad.data.dataset import PreparedDataset
    from lad.data.phantom import write_phantom_dataset
    from lad.data.prepare import load_prepare_config, prepare_dataset
    from lad.evaluation.crops import max_bounding_box
    from lad.evaluation.ct_features import load_feature_train_config, train_features
    from lad.evaluation.features import FeatureExtractor

    root = tmp_path_factory.mktemp("sensitivity")
    write_phantom_dataset(root / "raw", 32, seed=0, tumor_fraction=0.6, spacing=(6.0, 6.0, 5.0), size=(64, 64))
    prepare_dataset("abdomenct1k", root / "raw", root / "prepared", load_prepare_config("tiny"))
    train_features(root / "prepared", root / "features", load_feature_train_config("tiny"))
    ds = PreparedDataset(root / "prepared", split=None)
    patients = sorted({w["patient"] for w in ds.windows})
    half = [[i for i, w in enumerate(ds.windows) if patients.index(w["patient"]) % 2 == p] for p in (0, 1)]
    ref, other = ([ds[i]["image"] for i in h] for h in half)
    box = max_bounding_box([ds[i]["mask"][0] for i in range(len(ds))])
    rows = sensitivity_table(ref, other, [ds[i]["organs"][0] for i in half[1]], FeatureExtractor.from_spec(str(root / "features")), box)
    return {(r["degradation"], r["strength"]): r for r in rows}


def _series(table, kind, metric):
    return [table[("none (real vs real)", 0.0)][metric]] + [table[(kind, s)][metric] for s in DEGRADATIONS[kind]]


def test_degradations_do_what_they_say():
    import numpy as np

    rng = np.random.default_rng(0)
    hu = rng.normal(40, 5, (8, 16, 16)).astype(np.float32)
    hu[:, :2] = -1000  # air
    organs = np.zeros(hu.shape, np.uint8)
    organs[2:6, 6:10, 6:10] = 1
    hu[organs > 0] = 150
    assert 27 < float((degrade(hu, organs, "noise", 30, seed=1) - hu)[:, 2:].std()) < 33  # in the body (air clips)
    assert degrade(hu, organs, "blur", 2)[4].std() < hu[4].std()
    shifted = degrade(hu, organs, "shift", 50)
    assert np.allclose(shifted[:, 2:] - hu[:, 2:], 50) and np.all(shifted[:, :2] == -1000)
    removed = degrade(hu, organs, "organs removed", 1)
    assert abs(float(removed[organs > 0].mean()) - 40) < 5 and np.array_equal(removed[organs == 0], hu[organs == 0])
    with pytest.raises(ValueError, match="degradation"):
        degrade(hu, organs, "rotate", 1)


def test_metrics_grow_with_blur_and_strong_noise_and_see_shift(table):
    base = table[("none (real vs real)", 0.0)]
    assert base["n"] == base["n_reference"] == 16
    for m in METRICS + ("mmd_localized",):
        assert is_monotonic(_series(table, "blur", m)), (m, _series(table, "blur", m))
        assert table[("shift", 50.0)][m] > base[m], m
        noise = _series(table, "noise", m)
        assert noise[3] > max(noise[:3]), (m, noise)  # 100 HU: above real-vs-real and the weaker noise levels


def test_localized_metrics_see_removed_organs(table):
    base = table[("none (real vs real)", 0.0)]
    for m in ("fid_localized", "mmd_localized"):
        assert table[("organs removed", 1.0)][m] > base[m], m


@pytest.mark.xfail(strict=True, reason="at 16 vs 16 tiny windows, 10-30 HU noise is within the real-vs-real spread for some "
                   "metrics and holistic FID/MMD do not see removed organs (docs/evaluation.md, 'Sensitivity')")
def test_every_metric_is_monotonic_in_every_degradation(table):
    base = table[("none (real vs real)", 0.0)]
    for m in METRICS:
        assert is_monotonic(_series(table, "noise", m)), (m, _series(table, "noise", m))
        assert table[("organs removed", 1.0)][m] > base[m], m
