"""Dataset layouts: AbdomenCT-1K, TotalSegmentator (the shared real CT), MSD, pairs CSV, priors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lad.data.io import load_case
from lad.data.layouts import discover_cases, parse_label_map

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct" / "patient-a"
if not REAL.exists():
    REAL = Path("/work/shared/data/real-ct/patient-a")


def _write(path: Path, arr, spacing=(2.0, 2.0, 3.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def test_parse_label_map():
    assert parse_label_map("liver=5,spleen=1,kidney=2+3,pancreas=7,tumor=9") == {5: 1, 1: 3, 2: 2, 3: 2, 7: 4, 9: 5}
    with pytest.raises(ValueError, match="unknown organ 'lung'"):
        parse_label_map("lung=3")
    with pytest.raises(ValueError, match="malformed entry 'liver'"):
        parse_label_map("liver")


def test_unknown_layout_and_empty_input(tmp_path):
    with pytest.raises(ValueError, match="unknown layout 'nnunet'.*abdomenct1k"):
        discover_cases("nnunet", tmp_path)
    with pytest.raises(ValueError, match="no cases found"):
        discover_cases("abdomenct1k", tmp_path)


def test_abdomenct1k_pairs_images_and_masks(tmp_path):
    arr = np.zeros((4, 5, 6), np.int16)
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1, 1, 1] = 4
    _write(tmp_path / "Case_00002_0000.nii.gz", arr)
    _write(tmp_path / "Case_00002.nii.gz", lab)
    _write(tmp_path / "Case_00001_0000.nii.gz", arr)  # unlabeled
    cases = discover_cases("abdomenct1k", tmp_path)
    assert [c.case_id for c in cases] == ["Case_00001", "Case_00002"]
    assert cases[0].labels is None and cases[1].labels.name == "Case_00002.nii.gz"
    # priors fill the unlabeled case and are marked as predictions
    _write(tmp_path / "priors" / "Case_00001.nii.gz", lab)
    cases = discover_cases("abdomenct1k", tmp_path, priors=tmp_path / "priors")
    assert cases[0].labels_are_predictions and not cases[1].labels_are_predictions


def test_totalsegmentator_real_example_matches_readme_counts():
    cases = discover_cases("totalsegmentator", REAL)
    assert len(cases) == 1
    case = load_case(cases[0])
    org = sitk.GetArrayFromImage(case.organs)
    assert org.shape == (112, 101, 122)  # 122 x 101 x 112 voxels (x, y, z)
    counts = np.bincount(org.ravel(), minlength=6)
    assert counts[1] == 41602 and counts[3] == 9677 and counts[4] == 818
    assert counts[2] == 6993 + 5144  # the two kidneys do not overlap
    hu = sitk.GetArrayFromImage(case.image)
    assert 20 < hu[org == 1].mean() < 120  # non-contrast liver
    # a folder of subjects works as well as a single subject folder
    assert [c.case_id for c in discover_cases("totalsegmentator", REAL.parent)] == ["patient-a"]


def test_msd_with_dataset_json(tmp_path):
    arr = np.zeros((4, 5, 6), np.int16)
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1, 1, 1], lab[2, 2, 2] = 1, 2
    _write(tmp_path / "imagesTr" / "pancreas_001.nii.gz", arr)
    _write(tmp_path / "labelsTr" / "pancreas_001.nii.gz", lab)
    _write(tmp_path / "imagesTs" / "pancreas_002.nii.gz", arr)
    (tmp_path / "imagesTr" / "._pancreas_001.nii.gz").write_bytes(b"mac resource fork")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "training": [{"image": "./imagesTr/pancreas_001.nii.gz", "label": "./labelsTr/pancreas_001.nii.gz"}],
        "test": ["./imagesTs/pancreas_002.nii.gz"],
    }))
    cases = discover_cases("msd", tmp_path)
    assert [c.case_id for c in cases] == ["pancreas_001", "pancreas_002"]
    org = sitk.GetArrayFromImage(load_case(cases[0]).organs)
    assert org[1, 1, 1] == 4 and org[2, 2, 2] == 5  # pancreas -> 4, tumour -> 5
    assert cases[1].labels is None


def test_pairs_csv_with_label_map(tmp_path):
    arr = np.zeros((4, 5, 6), np.int16)
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1], lab[2, 2, 2], lab[3, 3, 3] = 5, 2, 3, 8
    _write(tmp_path / "a" / "img.nrrd", arr)
    _write(tmp_path / "a" / "lab.nii.gz", lab)
    (tmp_path / "list.csv").write_text("image,label\na/img.nrrd,a/lab.nii.gz\n")
    cases = discover_cases("pairs", tmp_path / "list.csv", label_map="liver=5,kidney=2+3")
    org = sitk.GetArrayFromImage(load_case(cases[0]).organs)
    assert org[0, 0, 0] == 1 and org[1, 1, 1] == 2 and org[2, 2, 2] == 2 and org[3, 3, 3] == 0  # 8 unmapped -> 0
    with pytest.raises(ValueError, match="applies to the pairs layout"):
        discover_cases("abdomenct1k", tmp_path, label_map="liver=1")
