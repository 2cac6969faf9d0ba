"""Priors: the segmenter learns, predictions keep each input's geometry (NIfTI and DICOM), flow into
`lad prepare --priors`; TotalSegmentator conversion on the shared example; fidelity Dice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lad.priors.predict import predict_priors, totalseg_to_labelmap
from lad.priors.train import evaluate_segmenter, load_segmenter_config, train_segmenter

REAL = Path("/work/shared/data/real-ct/patient-a")
for _p in Path(__file__).resolve().parents:
    if (_p / "shared" / "data" / "real-ct" / "patient-a").exists():
        REAL = _p / "shared" / "data" / "real-ct" / "patient-a"
        break


@pytest.fixture(scope="module")
def segmenter(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "seg"
    train_segmenter(tiny_prepared, out, load_segmenter_config("tiny"))
    return out


def test_segmenter_learns_on_its_training_windows(segmenter, tiny_prepared):
    from lad.data.dataset import PreparedDataset
    from lad.priors.segmenter import Segmenter

    model = Segmenter.from_pretrained(segmenter / "model")
    dice = evaluate_segmenter(model, PreparedDataset(tiny_prepared, split="train"), "cpu")
    assert dice["liver"] > 0.6  # the stated floor for 40 tiny steps: the loop learns
    metrics = json.loads((segmenter / "metrics.json").read_text())
    assert "liver" in metrics["dice"] and metrics["n_windows"] >= 1


def test_segmenter_resume_equals_uninterrupted(handmade_prepared, tmp_path):
    """The segmenter trains through the shared loop: killed after 3 of 4 steps (checkpoint at 2), resumed, the
    weights equal an uninterrupted run's; the loss is logged; a Dataset object (validated on itself) trains alike."""
    from safetensors.torch import load_file

    from conftest import WindowsDataset

    cfg = load_segmenter_config("tiny", ["steps=4", "checkpoint_every=2", "roi_size=[8, 16, 16]"])
    dice = train_segmenter(handmade_prepared, tmp_path / "a", cfg, progress_bar=False)
    assert train_segmenter(handmade_prepared, tmp_path / "b", cfg, stop_after=3, progress_bar=False) == {}
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.startswith("step")) == ["step_0000002"]
    assert train_segmenter(handmade_prepared, tmp_path / "b", cfg, resume=True, progress_bar=False) == dice
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows] == [4] and np.isfinite(rows[0]["loss"]) and rows[0]["skipped_steps"] == 0
    train_segmenter(WindowsDataset(handmade_prepared, organs=True), tmp_path / "c", cfg, progress_bar=False)
    c = load_file(str(tmp_path / "c" / "model" / "model.safetensors"))
    assert all(np.array_equal(a[k].numpy(), c[k].numpy()) for k in a)
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["data"] == "<WindowsDataset>" and metrics["split"] == "train (no test split)"


def test_predict_keeps_input_geometry_and_feeds_prepare(segmenter, tiny_prepared, tmp_path):
    from test_io import _write_dicom_series

    from lad.data.io import affine_dhw_to_ras, canonicalize, read_image, write_nifti
    from lad.data.phantom import generate_subject
    from lad.data.prepare import PrepareConfig, prepare_dataset

    subj = generate_subject(42, spacing=(6.0, 6.0, 5.0), size=(64, 64))
    raw = tmp_path / "raw"
    write_nifti(subj.hu, subj.affine, raw / "Case_00077_0000.nii.gz")
    # the same CT as a DICOM series (LPS, another origin convention) in a sub-folder
    _write_dicom_series(raw / "dicom_case", subj.hu[::-1].copy(), spacing=(6.0, 6.0, 5.0))
    s = predict_priors(raw, tmp_path / "labels", segmenter=segmenter)
    assert s["predicted"] == 2 and not s["failed"]
    for cid, src in (("Case_00077", raw / "Case_00077_0000.nii.gz"), ("dicom_case", raw / "dicom_case")):
        img, lab = read_image(src), read_image(tmp_path / "labels" / f"{cid}.nii.gz")
        assert lab.GetSize() == img.GetSize()
        assert np.allclose(lab.GetSpacing(), img.GetSpacing(), atol=1e-4)
        assert np.allclose(lab.GetOrigin(), img.GetOrigin(), atol=1e-3)
        assert np.allclose(lab.GetDirection(), img.GetDirection(), atol=1e-4)
        report = json.loads((tmp_path / "labels" / f"{cid}.json").read_text())
        assert report["organ_volumes_ml"]["liver"] > 0 and isinstance(report["flags"], list)
    # the predicted liver overlaps the phantom's liver voxel for voxel on the input grid: a flipped or
    # shifted geometry would give an overlap near 0 (a 150-step tiny segmenter is not a good one)
    lab = canonicalize(read_image(tmp_path / "labels" / "Case_00077.nii.gz"))
    arr = sitk.GetArrayFromImage(lab)
    assert np.allclose(affine_dhw_to_ras(lab), subj.affine)
    pred, true = arr == 1, subj.labels == 1
    dice = 2 * (pred & true).sum() / (pred.sum() + true.sum())
    flipped = 2 * (pred[:, :, ::-1] & true).sum() / (pred.sum() + true.sum())
    assert dice > 0.2 and dice > flipped + 0.15  # measured: 0.33 vs 0.01 flipped
    # resumable: a second call skips both
    assert predict_priors(raw, tmp_path / "labels", segmenter=segmenter)["skipped"] == 2
    # predicted labels flow through `lad prepare --priors` and are marked as predictions
    (tmp_path / "unl").mkdir()
    (tmp_path / "unl" / "Case_00077_0000.nii.gz").symlink_to(raw / "Case_00077_0000.nii.gz")
    cfg = PrepareConfig(spacing=(12.0, 12.0, 10.0), size=(32, 32), depth=8, organ="liver")
    summary = prepare_dataset("abdomenct1k", tmp_path / "unl", tmp_path / "prep", cfg, priors=tmp_path / "labels")
    assert summary["kept"] == 1
    man = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert all(w["labels_are_predictions"] for w in man["windows"])


def test_fidelity_dice_is_one_for_a_perfect_segmenter(tiny_prepared, monkeypatch, tmp_path):
    import torch

    from lad.data.dataset import PreparedDataset
    from lad.evaluation import fidelity
    from lad.priors.segmenter import Segmenter

    ds = PreparedDataset(tiny_prepared)
    vols = [ds[i]["image"] for i in range(2)]
    masks = [ds[i]["mask"][0] for i in range(2)]
    organs = [ds[i]["organs"][0] for i in range(2)]
    Segmenter(network="segresnet", network_kwargs={"init_filters": 8}, spacing=(12, 12, 10), roi_size=(8, 32, 32)).save_pretrained(tmp_path / "s")
    calls = iter(organs)
    monkeypatch.setattr(Segmenter, "predict", lambda self, x, **k: torch.from_numpy(next(calls)[None].astype(np.int64)))
    dice = fidelity.conditioning_fidelity(tmp_path / "s", vols, masks)
    assert dice["organ"] == pytest.approx(1.0)  # oracle: the volume's own organ map
    shifted = iter([np.roll(o, 10, axis=2) for o in organs])
    monkeypatch.setattr(Segmenter, "predict", lambda self, x, **k: torch.from_numpy(next(shifted)[None].astype(np.int64)))
    assert fidelity.conditioning_fidelity(tmp_path / "s", vols, masks)["organ"] < 0.5


def test_totalsegmentator_conversion_on_the_shared_example():
    from lad.data.io import read_image

    ref = read_image(REAL / "ct.nii.gz")
    lab = totalseg_to_labelmap(REAL / "segmentations", ref)
    arr = sitk.GetArrayFromImage(lab)
    counts = np.bincount(arr.ravel(), minlength=6)
    assert counts[1] == 41602 and counts[3] == 9677 and counts[4] == 818 and counts[2] == 6993 + 5144
    assert lab.GetSize() == ref.GetSize() and np.allclose(lab.GetDirection(), ref.GetDirection())


def test_totalsegmentator_backend_missing_says_what_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("totalsegmentator") is not None:
        pytest.skip("TotalSegmentator is installed here")
    with pytest.raises(ValueError, match="pip install TotalSegmentator"):
        predict_priors(REAL.parent, tmp_path / "o", backend="totalsegmentator")
    assert not (tmp_path / "o").exists()
