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


@pytest.mark.parametrize("sub", [("images", "labels"), ("imagesTr", "labelsTr")])
def test_abdomenct1k_in_subfolders(tmp_path, sub):
    arr = np.zeros((4, 5, 6), np.int16)
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1, 2, 3] = 3
    _write(tmp_path / sub[0] / "Case_00007_0000.nii.gz", arr)
    _write(tmp_path / sub[1] / "Case_00007.nii.gz", lab)
    _write(tmp_path / sub[0] / "Case_00008_0000.nii.gz", arr)
    cases = discover_cases("abdomenct1k", tmp_path)
    assert [(c.case_id, c.labels and c.labels.parent.name) for c in cases] == [("Case_00007", sub[1]), ("Case_00008", None)]
    org = sitk.GetArrayFromImage(load_case(cases[0]).organs)
    assert org[1, 2, 3] == 3 and org.sum() == 3


def test_totalsegmentator_synthetic_overlap_order_and_ignored_files(tmp_path):
    subj = tmp_path / "s0001"
    shape = (4, 5, 6)
    _write(subj / "ct.nii.gz", np.zeros(shape, np.int16))

    def mask(*idx):
        m = np.zeros(shape, np.uint8)
        for i in idx:
            m[i] = 1
        return m

    _write(subj / "segmentations" / "liver.nii.gz", mask((0, 0, 0), (1, 1, 1)))
    _write(subj / "segmentations" / "kidney_left.nii.gz", mask((2, 2, 2), (3, 3, 3)))
    _write(subj / "segmentations" / "kidney_right.nii.gz", mask((2, 0, 0)))
    _write(subj / "segmentations" / "spleen.nii.gz", mask((3, 3, 3)))  # overlaps kidney_left: spleen (later) wins
    _write(subj / "segmentations" / "pancreas.nii.gz", mask((1, 1, 1)))  # overlaps liver: pancreas wins
    _write(subj / "segmentations" / "aorta.nii.gz", mask((0, 4, 5)))  # not one of ours: ignored
    (tmp_path / "notes").mkdir()  # a folder without ct.nii.gz is not a subject
    cases = discover_cases("totalsegmentator", tmp_path)
    assert [c.case_id for c in cases] == ["s0001"] and len(cases[0].labels) == 5
    org = sitk.GetArrayFromImage(load_case(cases[0]).organs)
    expect = np.zeros(shape, np.uint8)
    expect[0, 0, 0], expect[2, 2, 2], expect[2, 0, 0], expect[3, 3, 3], expect[1, 1, 1] = 1, 2, 2, 3, 4
    assert np.array_equal(org, expect)
    _write(subj / "segmentations" / "spleen.nii.gz", mask((3, 3, 3)) * 2)
    with pytest.raises(ValueError, match=r"spleen.nii.gz: expected a binary mask"):
        load_case(discover_cases("totalsegmentator", subj)[0])


def test_msd_without_dataset_json_and_priors_for_test_cases(tmp_path):
    arr = np.zeros((4, 5, 6), np.int16)
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1, 1, 1] = 2
    _write(tmp_path / "imagesTr" / "pancreas_004.nii.gz", arr)
    _write(tmp_path / "labelsTr" / "pancreas_004.nii.gz", lab)
    _write(tmp_path / "imagesTs" / "pancreas_009.nii.gz", arr)
    (tmp_path / "imagesTs" / "._pancreas_009.nii.gz").write_bytes(b"x")
    prior = np.zeros((4, 5, 6), np.uint8)
    prior[0, 1, 2] = 4  # priors hold OUR label values: 4 stays pancreas (no MSD mapping)
    _write(tmp_path / "priors" / "pancreas_009.nii.gz", prior)
    cases = discover_cases("msd", tmp_path, priors=tmp_path / "priors")
    assert [(c.case_id, c.labels_are_predictions) for c in cases] == [("pancreas_004", False), ("pancreas_009", True)]
    assert sitk.GetArrayFromImage(load_case(cases[0]).organs)[1, 1, 1] == 5  # MSD tumour 2 -> 5
    pred = load_case(cases[1])
    assert pred.labels_are_predictions and sitk.GetArrayFromImage(pred.organs)[0, 1, 2] == 4


def test_pairs_with_dicom_folder_and_unlabeled_row(tmp_path):
    from test_io import _write_dicom_series

    arr = np.zeros((3, 4, 5), np.int16)
    _write_dicom_series(tmp_path / "data" / "pat1_dcm", arr, spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0))
    lab = np.zeros((3, 4, 5), np.uint8)
    lab[2, 3, 4] = 7
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(tmp_path / "data" / "pat1_seg.nii.gz"))
    _write(tmp_path / "data" / "pat2.nii.gz", arr)
    (tmp_path / "data" / "list.csv").write_text("image,label\npat2.nii.gz,\npat1_dcm,pat1_seg.nii.gz\n")
    cases = discover_cases("pairs", tmp_path / "data" / "list.csv", label_map="pancreas=7")
    assert [(c.case_id, c.labels is None) for c in cases] == [("pat1_dcm", False), ("pat2", True)]
    case = load_case(cases[0])
    assert np.allclose(case.organs.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)
    assert sitk.GetArrayFromImage(case.organs)[2, 3, 4] == 4 and sitk.GetArrayFromImage(case.organs).sum() == 4
    with pytest.raises(ValueError, match=r"malformed entry 'pancreas=x'"):
        discover_cases("pairs", tmp_path / "data" / "list.csv", label_map="liver=1,pancreas=x")
