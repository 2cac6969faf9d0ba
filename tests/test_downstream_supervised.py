"""`lad downstream supervised`: metrics vs hand-computed oracles, a tiny real vs real+synthetic run,
resume, and the input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lad.downstream.supervised.metrics import (aggregate, dice_per_class, equivalent_diameter_mm, nsd_per_class,
                                               patient_metrics, tumour_components)

TOL = {"organ": 2.0, "tumor": 2.0}


def _box(shape, sl, value=1, out=None):
    a = np.zeros(shape, np.uint8) if out is None else out
    a[sl] = value
    return a


# ------------------------------------------------------------------------------------------------ metrics


def test_dice_hand_computed_and_empty_classes():
    gt = _box((8, 10, 10), np.s_[2:4, 2:6, 2:6])  # 32 organ voxels
    pred = _box((8, 10, 10), np.s_[3:5, 2:6, 2:6])  # shifted one slice: 16 shared
    d = dice_per_class(pred, gt)
    assert d["organ"] == pytest.approx(2 * 16 / 64)
    assert math.isnan(d["tumor"])  # both empty -> NaN (excluded), never 1 or 0
    # tumour predicted on a tumour-free ground truth: still NaN for DSC (specificity counts it)
    pred[0, 0, 0] = 2
    assert math.isnan(dice_per_class(pred, gt)["tumor"])
    gt2 = _box((8, 10, 10), np.s_[5:7, 5:7, 5:7], 2, out=gt.copy())
    assert dice_per_class(pred, gt2)["tumor"] == 0.0  # tumour missed entirely


def test_nsd_uses_anisotropic_spacing_in_mm():
    # a 2-slice-thick box: every voxel is a surface voxel (32 per mask). Shifted by one voxel along an axis, half
    # of each surface lies one voxel away from the other: inside the tolerance iff that voxel size <= tolerance.
    gt = _box((8, 10, 10), np.s_[2:4, 2:6, 2:6])
    shift_z = _box((8, 10, 10), np.s_[3:5, 2:6, 2:6])
    shift_y = _box((8, 10, 10), np.s_[2:4, 3:7, 2:6])
    spacing = (3.0, 1.0, 1.0)  # mm along (D, H, W)
    assert nsd_per_class(shift_z, gt, spacing, TOL)["organ"] == pytest.approx((16 + 16) / (32 + 32))  # 3 mm > 2 mm
    assert nsd_per_class(shift_y, gt, spacing, TOL)["organ"] == pytest.approx(1.0)  # 1 mm <= 2 mm
    assert nsd_per_class(shift_z, gt, spacing, {"organ": 3.0, "tumor": 2.0})["organ"] == pytest.approx(1.0)
    # 3 mm along H: the box is 4 voxels long there, so only the end slab (8 of 32 voxels) of each surface is out
    assert nsd_per_class(shift_y, gt, (1.0, 3.0, 1.0), TOL)["organ"] == pytest.approx((24 + 24) / (32 + 32))
    # empty cases: both empty -> NaN; ground truth present, nothing predicted -> 0
    assert math.isnan(nsd_per_class(shift_z, gt, spacing, TOL)["tumor"])
    assert nsd_per_class(np.zeros_like(gt), gt, spacing, TOL)["organ"] == 0.0


def test_equivalent_diameter():
    # 2x2x2 voxels of 2 mm: 64 mm^3 -> (6 * 64 / pi)^(1/3) = 4.9628 mm
    assert equivalent_diameter_mm(8, (2.0, 2.0, 2.0)) == pytest.approx((6 * 64 / math.pi) ** (1 / 3))
    assert equivalent_diameter_mm(8, (2.0, 2.0, 2.0)) == pytest.approx(4.9628, abs=1e-4)
    # a sphere of diameter 20 mm has volume 4188.79 mm^3
    assert equivalent_diameter_mm(4188.790205, (1.0, 1.0, 1.0)) == pytest.approx(20.0, abs=1e-6)


def test_patient_tumour_and_early_sensitivity_on_constructed_components():
    spacing = (2.0, 2.0, 2.0)
    shape = (16, 24, 24)
    gt = _box(shape, np.s_[1:3, 1:3, 1:3], 2)  # small: 8 voxels, 4.96 mm -> early
    _box(shape, np.s_[5:15, 10:20, 10:20], 2, out=gt)  # large: 1000 voxels, 8000 mm^3, 24.8 mm -> not early
    comps = tumour_components(gt, gt, spacing)
    assert sorted(c["voxels"] for c in comps) == [8, 1000]
    assert sorted(round(c["diameter_mm"], 2) for c in comps) == [4.96, 24.81]
    # diagonal contact counts as connected (26-connectivity)
    diag = _box((4, 4, 4), np.s_[0, 0, 0], 2)
    diag[1, 1, 1] = 2
    assert len(tumour_components(diag, diag, (1, 1, 1))) == 1

    pred_a = _box(shape, np.s_[8:9, 12:13, 12:13], 2)  # one voxel inside the large tumour only
    a = patient_metrics("a", pred_a, gt, spacing, tolerance_mm=TOL)
    healthy_gt = np.zeros(shape, np.uint8)
    b = patient_metrics("b", _box(shape, np.s_[0, 0, 0], 2), healthy_gt, spacing, tolerance_mm=TOL)  # false positive
    c = patient_metrics("c", np.zeros(shape, np.uint8), healthy_gt, spacing, tolerance_mm=TOL)
    d = patient_metrics("d", np.zeros(shape, np.uint8), gt, spacing, tolerance_mm=TOL)  # missed
    e = patient_metrics("e", _box(shape, np.s_[0, 23, 23], 2), gt, spacing, tolerance_mm=TOL)  # flagged, wrong place
    assert e.tumour_flagged and not e.tumour_detected
    agg = aggregate([a, b, c, d, e], early_diameter_mm=20.0)
    assert agg["patient_sensitivity"] == {"value": 1 / 3, "hits": 1, "total": 3}
    assert agg["patient_specificity"] == {"value": 0.5, "hits": 1, "total": 2}
    assert agg["tumor_sensitivity"] == {"value": 1 / 6, "hits": 1, "total": 6}
    assert agg["early_tumor_sensitivity"] == {"value": 0.0, "hits": 0, "total": 3}
    # DSC tumour: only a (2*1/(1+1008)), d (0) and e (0) count; b and c have no tumour -> excluded
    assert agg["dice"]["tumor"]["n"] == 3
    assert agg["dice"]["tumor"]["mean"] == pytest.approx((2 / 1009 + 0 + 0) / 3)
    assert agg["dice"]["organ"] == {"mean": None, "n": 0}
    # a higher detection threshold turns the one-voxel hit into a miss at patient level
    assert not patient_metrics("a", pred_a, gt, spacing, tolerance_mm=TOL, min_detect_voxels=2).tumour_detected
    json.dumps(a.to_dict())  # NaN-free JSON
    assert b.to_dict()["dice"]["tumor"] is None


# ------------------------------------------------------------------------------------------------ experiment


def write_samples(folder: Path, prepared: Path, split: str = "train", n: int | None = None, *, crop: bool = False,
                  relative_source: bool = False) -> Path:
    """A `lad sample`-style folder (docs/sampling.md "Output folder") built from prepared windows: the CT is
    the window's HU plus noise, the mask its Lad mask; records name the source window like `lad sample`."""
    from lad.data.dataset import PreparedDataset
    from lad.data.io import write_nifti

    ds = PreparedDataset(prepared, split=split, organ_labels=False)
    rng = np.random.default_rng(1)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    lines = []
    for j in range(len(ds) if n is None else n):
        r = ds.get_arrays(j, organs=False)
        hu = np.clip(r["hu"] + rng.normal(0, 20, r["hu"].shape), -1000, 400).astype(np.int16)
        mask = r["mask"]
        if crop:
            hu, mask = hu[:, :-2], mask[:, :-2]
        files = {"ct": f"samples/sample_{j:06d}_ct.nii.gz", "mask": f"samples/sample_{j:06d}_mask.nii.gz"}
        write_nifti(hu, r["affine"], folder / files["ct"])
        write_nifti(mask, r["affine"], folder / files["mask"])
        src = Path(prepared).name if relative_source else Path(prepared).resolve()  # `lad sample` records the path as given
        lines.append(json.dumps({"id": f"sample_{j:06d}", "index": j, "source_mask": f"{src}:{r['meta']['id']}",
                                 "source_id": r["meta"]["id"], "files": files}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def samples(tiny_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    write_samples(root / "s", tiny_prepared)
    # one extra sample conditioned on a test window: must never be used (label leakage)
    test = write_samples(root / "t", tiny_prepared, split="test", n=1)
    rec = json.loads((test / "manifest.jsonl").read_text().splitlines()[0])
    for k in ("ct", "mask"):
        src = test / rec["files"][k]
        rec["files"][k] = rec["files"][k].replace("sample_000000", "sample_999999")
        (root / "s" / rec["files"][k]).write_bytes(src.read_bytes())
    rec["id"] = "sample_999999"
    with open(root / "s" / "manifest.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return root / "s"


@pytest.fixture(scope="module")
def tiny_experiment(tiny_prepared, samples, tmp_path_factory):
    from lad.cli import main

    out = tmp_path_factory.mktemp("sup") / "out"
    rc = main(["downstream", "supervised", "--data", str(tiny_prepared), "--synthetic", str(samples),
               "--synthetic-multiple", "2", "--real-sizes", "1,2", "--preset", "tiny", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_tiny_run_writes_both_arms_per_size_and_the_curve(tiny_experiment, tiny_prepared):
    from lad.data.dataset import PreparedDataset

    res = json.loads((tiny_experiment / "results.json").read_text())
    assert res["preset"] == "tiny" and res["definitions"]["nsd_tolerance_mm"] == TOL
    assert res["definitions"]["early_tumor_diameter_mm"] == 20.0
    assert sorted((r["real_patients"], r["arm"]) for r in res["runs"]) == [
        (1, "real"), (1, "real+synthetic"), (2, "real"), (2, "real+synthetic")]
    test = PreparedDataset(tiny_prepared, split="test", organ_labels=False)
    test_patients = {w["patient"] for w in test.windows}
    assert res["n_test_patients"] == len(test_patients)
    train = PreparedDataset(tiny_prepared, split="train", organ_labels=False)
    windows_of = {}
    for w in train.windows:
        windows_of.setdefault(w["patient"], []).append(w["id"])
    for r in res["runs"]:
        m = r["metrics"]
        assert set(m["dice"]) == {"organ", "tumor"} and set(m["nsd"]) == {"organ", "tumor"}
        for v in (m["dice"]["organ"]["mean"], m["patient_sensitivity"]["value"], m["tumor_sensitivity"]["value"]):
            assert v is None or 0.0 <= v <= 1.0
        data = json.loads((tiny_experiment / "models" / f"real{r['real_patients']:04d}_{r['arm']}" / "data.json").read_text())
        assert len(data["real_patients"]) == r["real_patients"]
        assert sorted(data["real_windows"]) == sorted(w for p in data["real_patients"] for w in windows_of[p])
        assert r["n_real_windows"] == len(data["real_windows"])
        if r["arm"] == "real":
            assert r["n_synthetic"] == 0
        else:  # 2 per real window, capped by the train-sourced samples; the test-sourced one is never used
            assert r["n_synthetic"] == min(2 * r["n_real_windows"], len(train)) == len(data["synthetic"])
            assert "sample_999999" not in data["synthetic"]
    # nested subsets: the size-1 patient is the first of the size-2 ones
    d1 = json.loads((tiny_experiment / "models" / "real0001_real" / "data.json").read_text())
    d2 = json.loads((tiny_experiment / "models" / "real0002_real" / "data.json").read_text())
    assert d2["real_patients"][:1] == d1["real_patients"]
    png = (tiny_experiment / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    cfg = json.loads((tiny_experiment / "models" / "real0001_real" / "model" / "config.json").read_text())
    assert cfg["num_classes"] == 3 and cfg["_extra"]["hu_window"] == [-175.0, 250.0]
    assert list((tiny_experiment / "models" / "real0001_real" / "tb").glob("events.out.tfevents*"))


def test_resume_skips_finished_models(tiny_experiment, tiny_prepared, samples):
    from lad.downstream.supervised import load_supervised_config, run_supervised

    weights = sorted((tiny_experiment / "models").glob("*/model/model.safetensors"))
    assert len(weights) == 4
    before = {p: p.stat().st_mtime_ns for p in weights}
    old = json.loads((tiny_experiment / "results.json").read_text())
    res = run_supervised(tiny_prepared, tiny_experiment, load_supervised_config("tiny"), synthetic=samples,
                         synthetic_multiple=2, real_sizes="1,2", preset="tiny", resume=True)
    assert {p: p.stat().st_mtime_ns for p in weights} == before  # nothing retrained
    assert res["runs"] == old["runs"]
    with pytest.raises(FileExistsError, match="--resume"):
        run_supervised(tiny_prepared, tiny_experiment, load_supervised_config("tiny"), synthetic=samples,
                       synthetic_multiple=2, real_sizes="1,2", preset="tiny")
    with pytest.raises(ValueError, match="different settings"):
        run_supervised(tiny_prepared, tiny_experiment, load_supervised_config("tiny", ["lr=0.1"]), synthetic=samples,
                       synthetic_multiple=2, real_sizes="1,2", preset="tiny", resume=True)


def test_killed_training_resumes_to_the_uninterrupted_weights(tiny_prepared, tmp_path):
    import torch

    from lad.data.dataset import PreparedDataset
    from lad.downstream.supervised.data import axis_spacing, real_items
    from lad.downstream.supervised.experiment import load_supervised_config, train_model

    ds = PreparedDataset(tiny_prepared, split="train", organ_labels=False)
    items = real_items(ds, sorted({w["patient"] for w in ds.windows}))
    cfg = load_supervised_config("tiny", ["checkpoint_every=2", "steps=4"])
    kw = dict(spacing=axis_spacing(ds.windows[0]["affine"]), window_shape=ds.shape, device=torch.device("cpu"), desc="t")
    full = train_model(items, tmp_path / "a", cfg, resume=False, **kw)
    assert train_model(items, tmp_path / "b", cfg, resume=False, stop_after=2, **kw) is None
    resumed = train_model(items, tmp_path / "b", cfg, resume=True, **kw)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_training_learns_the_organ_and_test_patients_are_stitched(tmp_path):
    import torch
    from conftest import write_prepared

    from lad.data.dataset import PreparedDataset
    from lad.downstream.supervised.data import axis_spacing, real_items, stitch_test_patients
    from lad.downstream.supervised.experiment import evaluate_model, load_supervised_config, train_model

    root = write_prepared(tmp_path / "p", patients=4, windows=2, test_patients=1)  # organ blobs of ~300 voxels
    train = PreparedDataset(root, split="train", organ_labels=False)
    stitched = stitch_test_patients(train)
    assert [p.mask.shape for p in stitched] == [(16, 32, 32)] * 3  # two 8-slice windows per patient, end to end
    r = train.get_arrays(1, organs=False)
    assert np.array_equal(stitched[0].mask[8:], r["mask"]) and stitched[0].spacing == (10.0, 12.0, 12.0)
    cfg = load_supervised_config("tiny", ["steps=60", "checkpoint_every=60", "log_every=60"])
    model = train_model(real_items(train, sorted({w["patient"] for w in train.windows})), tmp_path / "m", cfg,
                        spacing=axis_spacing(train.windows[0]["affine"]), window_shape=train.shape,
                        device=torch.device("cpu"), resume=False, desc="learn")
    ev = evaluate_model(model, stitched, cfg, torch.device("cpu"))
    assert ev["summary"]["dice"]["organ"]["n"] == 3
    assert ev["summary"]["dice"]["organ"]["mean"] > 0.4  # 0.63 measured after 60 steps (CPU, seed 0)


def test_bad_inputs_give_one_clear_error(tiny_prepared, tmp_path):
    from conftest import write_prepared

    from lad.downstream.supervised import load_supervised_config, run_supervised

    cfg = load_supervised_config("tiny")
    with pytest.raises(FileNotFoundError, match="synthetic samples folder does not exist"):
        run_supervised(tiny_prepared, tmp_path / "o1", cfg, synthetic=tmp_path / "nowhere", real_sizes="1")
    (tmp_path / "nomanifest").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.jsonl"):
        run_supervised(tiny_prepared, tmp_path / "o2", cfg, synthetic=tmp_path / "nomanifest", real_sizes="1")
    bad = write_samples(tmp_path / "cropped", tiny_prepared, n=2, crop=True)
    with pytest.raises(ValueError, match="different grid"):
        run_supervised(tiny_prepared, tmp_path / "o3", cfg, synthetic=bad, real_sizes="1")
    # same shape, other spacing
    other = write_prepared(tmp_path / "other", spacing=(7.0, 7.0, 9.0), shape=(8, 32, 32), test_patients=1)
    with pytest.raises(ValueError, match="different grid"):
        run_supervised(tiny_prepared, tmp_path / "o4", cfg, synthetic=write_samples(tmp_path / "s4", other, n=2), real_sizes="1")
    with pytest.raises(ValueError, match="leak test labels"):
        run_supervised(tiny_prepared, tmp_path / "o9", cfg, synthetic=write_samples(tmp_path / "s9", tiny_prepared, "test"),
                       real_sizes="1")
    with pytest.raises(ValueError, match="leak test labels"):  # recorded as a relative path from another working dir
        run_supervised(tiny_prepared, tmp_path / "o10", cfg, real_sizes="1",
                       synthetic=write_samples(tmp_path / "s10", tiny_prepared, "test", relative_source=True))
    empty = write_prepared(tmp_path / "empty", patients=2, test_patients=2)
    with pytest.raises(ValueError, match="empty training set"):
        run_supervised(empty, tmp_path / "o5", cfg, real_sizes="1")
    with pytest.raises(ValueError, match="has only"):
        run_supervised(tiny_prepared, tmp_path / "o6", cfg, real_sizes="1,50")
    with pytest.raises(ValueError, match="--real-sizes"):
        run_supervised(tiny_prepared, tmp_path / "o7", cfg, real_sizes="two")
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o5").exists()  # errors come before any output
    with pytest.raises(ValueError, match="cannot process crops of"):  # BasicUNet downsamples 8 slices to nothing
        run_supervised(tiny_prepared, tmp_path / "o8", load_supervised_config("tiny", ["network=basicunet", "network_kwargs={}"]),
                       real_sizes="1")


def test_ood_test_set_and_synthetic_volume_sweep(tiny_prepared, samples, tmp_path):
    import csv

    from conftest import write_prepared

    from lad.downstream.supervised import load_supervised_config, run_supervised
    from lad.downstream.supervised.experiment import metric_value

    # another dataset on the same grid (8 x 32 x 32 at 10 x 12 x 12 mm, D x H x W): every patient is an OOD test patient
    ood = write_prepared(tmp_path / "ood", patients=3, windows=2, test_patients=1)
    cfg = load_supervised_config("tiny")
    out = tmp_path / "out"
    res = run_supervised(tiny_prepared, out, cfg, synthetic=samples, synthetic_volumes="0,2", real_sizes="1", ood_test=ood,
                         preset="tiny")
    assert res["n_ood_patients"] == 3 and res["n_ood_with_tumor"] == 3 and res["ood_test"] == str(ood.resolve())
    assert res["synthetic_volumes"] == [0, 2] and res["synthetic_multiple"] == 0
    assert [(r["arm"], r["synthetic_volumes"], r["n_synthetic"]) for r in res["runs"]] == [("real", 0, 0), ("real+2synthetic", 2, 2)]
    for r in res["runs"]:
        metrics = json.loads((out / "models" / f"real0001_{r['arm']}" / "metrics.json").read_text())
        assert [p["patient"] for p in metrics["patients_ood"]] == ["p00", "p01", "p02"]
        assert [p["patient"] for p in metrics["patients"]] != [p["patient"] for p in metrics["patients_ood"]]
        m = r["metrics_ood"]  # every metric of the supplement, out of distribution
        assert m["tumor_sensitivity"]["total"] == sum(len(p["components"]) for p in metrics["patients_ood"]) > 0
        assert m["patient_sensitivity"]["total"] == 3 and m["dice"]["tumor"]["n"] == 3 and m["nsd"]["organ"]["n"] == 3
        assert set(m) == set(r["metrics"]) >= {"early_tumor_sensitivity", "patient_sensitivity", "tumor_sensitivity"}
    assert (out / "scaling_ood.png").read_bytes()[:4] == b"\x89PNG" and (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(int(r["real_patients"]), int(r["synthetic_volumes"])) for r in rows] == [(1, 0), (1, 2)]
    for row, run in zip(rows, res["runs"]):
        for col, key, cls in (("dsc_tumor", "dice", "tumor"), ("ood_dsc_tumor", "dice", "tumor"),
                              ("ood_early_tumor_sensitivity", "early_tumor_sensitivity", None)):
            m = run["metrics_ood"] if col.startswith("ood_") else run["metrics"]
            v = metric_value(m, key, cls)
            assert (row[col] == "") if math.isnan(v) else float(row[col]) == pytest.approx(v, abs=1e-4)
    assert "| real_patients |" in (out / "sweep.md").read_text()
    with pytest.raises(ValueError, match="different settings"):  # another OOD set is another experiment
        run_supervised(tiny_prepared, out, cfg, synthetic=samples, synthetic_volumes="0,2", real_sizes="1", preset="tiny",
                       resume=True)
    # the OOD set must be on the training grid and another dataset
    other = write_prepared(tmp_path / "other", spacing=(7.0, 7.0, 9.0), test_patients=1)
    with pytest.raises(ValueError, match="training data's spacing"):
        run_supervised(tiny_prepared, tmp_path / "o1", cfg, real_sizes="1", ood_test=other)
    with pytest.raises(ValueError, match="training dataset itself"):
        run_supervised(tiny_prepared, tmp_path / "o2", cfg, real_sizes="1", ood_test=tiny_prepared)
    with pytest.raises(ValueError, match="not both"):
        run_supervised(tiny_prepared, tmp_path / "o3", cfg, synthetic=samples, synthetic_multiple=2, synthetic_volumes="2",
                       real_sizes="1")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_real_to_synthetic_ratio_is_a_setting(tiny_prepared, samples, tmp_path):
    from lad.downstream.supervised import load_supervised_config, run_supervised

    assert load_supervised_config("paper").synthetic_multiple == 3.0  # the supplement's "extra 3x synthetic data"
    cfg = load_supervised_config("tiny", ["synthetic_multiple=0.5", "steps=1"])
    res = run_supervised(tiny_prepared, tmp_path / "o", cfg, synthetic=samples, real_sizes="2", preset="tiny")
    syn = [r for r in res["runs"] if r["arm"] == "real+synthetic"][0]
    assert res["synthetic_multiple"] == 0.5 and syn["n_synthetic"] == round(0.5 * syn["n_real_windows"]) > 0
    # the option overrides the preset value
    res = run_supervised(tiny_prepared, tmp_path / "o2", cfg, synthetic=samples, synthetic_multiple=1, real_sizes="2", preset="tiny")
    syn = [r for r in res["runs"] if r["arm"] == "real+synthetic"][0]
    assert syn["n_synthetic"] == syn["n_real_windows"]


def test_presets_carry_the_paper_protocol():
    from lad.config import ConfigError
    from lad.downstream.supervised import load_supervised_config

    paper = load_supervised_config("paper")
    assert paper.roi_size == (96, 96, 96) and paper.hu_window == (-175.0, 250.0) and paper.sw_overlap == 0.5
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.steps) == ("sgd", 0.01, 2, 1000 * 250)
    for name in ("demo", "tiny"):
        cfg = load_supervised_config(name)
        assert cfg.sw_overlap == 0.5 and cfg.hu_window == (-175.0, 250.0) and cfg.nsd_tolerance_mm == TOL
    with pytest.raises(ConfigError, match="unknown"):
        load_supervised_config("tiny", ["no_such_key=1"])
    with pytest.raises(ConfigError, match="optimizer"):
        load_supervised_config("tiny", ["optimizer=rmsprop"])
