"""Reading CT with geometry: canonical orientation, RAS affines, label alignment, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from lad.data.io import CaseError, affine_dhw_to_ras, canonicalize, image_from_array, load_case, read_image, write_nifti
from lad.data.layouts import CaseSpec


def _img(arr, spacing=(1.0, 2.0, 3.0), origin=(10.0, -20.0, 30.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _ras_of(affine, dhw):
    return (affine @ np.array([*dhw, 1.0]))[:3]


def test_write_read_round_trip_keeps_array_and_affine(tmp_path):
    arr = np.random.default_rng(0).integers(-1000, 400, size=(5, 6, 7)).astype(np.int16)
    affine = affine_dhw_to_ras(_img(arr))
    write_nifti(arr, affine, tmp_path / "a.nii.gz")
    back = canonicalize(read_image(tmp_path / "a.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(back), arr)
    assert np.allclose(affine_dhw_to_ras(back), affine)
    # nibabel (the NIfTI world) agrees on where voxel (d, h, w) is, in RAS mm
    import nibabel as nib

    nii = nib.load(tmp_path / "a.nii.gz")
    i, j, k = 3, 4, 2  # nibabel's (x, y, z) index of our (d=2, h=4, w=3)
    assert np.allclose(nii.affine @ [i, j, k, 1], affine @ [2, 4, 3, 1])


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, -1, 1), (-1, 1, -1)])
def test_canonicalize_puts_a_marker_where_the_affine_says(flip):
    arr = np.zeros((6, 7, 8), np.float32)
    arr[1, 2, 3] = 100.0  # index (z=1, y=2, x=3)
    img = _img(arr, direction=(flip[0], 0, 0, 0, flip[1], 0, 0, 0, flip[2]))
    lps = np.array(img.TransformIndexToPhysicalPoint((3, 2, 1)))
    can = canonicalize(img)
    assert np.allclose(can.GetDirection(), np.eye(3).ravel())
    carr = sitk.GetArrayFromImage(can)
    d, h, w = np.argwhere(carr == 100.0)[0]
    ras = _ras_of(affine_dhw_to_ras(can), (d, h, w))
    assert np.allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-4)


def test_permuted_axes_are_canonicalised():
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 2, 3] = 7.0
    img = _img(arr, direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))  # x and y swapped
    lps = np.array(img.TransformIndexToPhysicalPoint((3, 2, 1)))
    can = canonicalize(img)
    d, h, w = np.argwhere(sitk.GetArrayFromImage(can) == 7.0)[0]
    assert np.allclose(_ras_of(affine_dhw_to_ras(can), (d, h, w)), [-lps[0], -lps[1], lps[2]])


def test_image_from_array_inverts_affine():
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    aff = affine_dhw_to_ras(_img(arr, spacing=(0.7, 0.8, 2.5)))
    img = image_from_array(arr, aff)
    assert np.allclose(affine_dhw_to_ras(img), aff) and np.allclose(img.GetSpacing(), (0.7, 0.8, 2.5))


def test_label_stored_flipped_ends_aligned(tmp_path):
    img_arr = np.zeros((6, 8, 10), np.int16)
    lab_arr = np.zeros((6, 8, 10), np.uint8)
    lab_arr[2:4, 1:3, 1:4] = 4  # pancreas block near the low x end
    img_arr[lab_arr > 0] = 40
    image = _img(img_arr, spacing=(1, 1, 1), origin=(0, 0, 0))
    # the same physical label stored with x flipped: array reversed along x, direction -1, origin at the far end
    flipped = _img(lab_arr[:, :, ::-1].copy(), spacing=(1, 1, 1), origin=(9, 0, 0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(flipped, str(tmp_path / "lab.nii.gz"))
    case = load_case(CaseSpec("c", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", None, "pairs"))
    org = sitk.GetArrayFromImage(case.organs)
    img = sitk.GetArrayFromImage(case.image)
    assert org.sum() == lab_arr.sum()
    assert np.all(img[org == 4] == 40) and np.all(img[org == 0] == 0)


def test_coarser_label_is_resampled_onto_image_grid(tmp_path):
    image = _img(np.zeros((8, 8, 8), np.int16), spacing=(1, 1, 1), origin=(0, 0, 0))
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    coarse = _img(lab, spacing=(2, 2, 2), origin=(0.5, 0.5, 0.5))
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(coarse, str(tmp_path / "lab.nii.gz"))
    case = load_case(CaseSpec("c", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", None, "pairs"))
    org = sitk.GetArrayFromImage(case.organs)
    assert org.shape == (8, 8, 8) and org.sum() == 4 * 4 * 4 and org[2:6, 2:6, 2:6].all()


def test_label_with_other_extent_is_rejected_naming_the_file(tmp_path):
    sitk.WriteImage(_img(np.zeros((8, 8, 8), np.int16), spacing=(1, 1, 1), origin=(0, 0, 0)), str(tmp_path / "img.nii.gz"))
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2, 2, 2] = 1
    sitk.WriteImage(_img(lab, spacing=(1, 1, 1), origin=(50, 0, 0)), str(tmp_path / "lab.nii.gz"))
    with pytest.raises(CaseError, match=r"lab\.nii\.gz: label covers a different physical extent"):
        load_case(CaseSpec("c", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", None, "pairs"))


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(CaseError, match="corrupt.nii.gz: unreadable or corrupt"):
        read_image(bad)
    with pytest.raises(CaseError, match="missing.nii.gz: file not found"):
        read_image(tmp_path / "missing.nii.gz")
    arr = np.zeros((3, 4, 5), np.float32)
    arr[1, 1, 1] = np.nan
    sitk.WriteImage(_img(arr), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(CaseError, match="nan.nii.gz: image contains NaN"):
        read_image(tmp_path / "nan.nii.gz")
    sitk.WriteImage(_img(np.zeros((3, 4, 5), np.int16)), str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(_img(np.zeros((3, 4, 5), np.uint8)), str(tmp_path / "empty.nii.gz"))
    with pytest.raises(CaseError, match="empty label map"):
        load_case(CaseSpec("c", tmp_path / "img.nii.gz", tmp_path / "empty.nii.gz", None, "pairs"))
    lab = np.zeros((3, 4, 5), np.uint8)
    lab[0, 0, 0] = 9
    sitk.WriteImage(_img(lab), str(tmp_path / "nine.nii.gz"))
    with pytest.raises(CaseError, match=r"nine.nii.gz: unexpected label values \[9\]"):
        load_case(CaseSpec("c", tmp_path / "img.nii.gz", tmp_path / "nine.nii.gz", None, "pairs"))


def _write_dicom_series(folder, arr, spacing=(0.8, 0.8, 2.5), origin=(-100.0, -120.0, 50.0), uid="1.2.826.0.1.3680043.2.1125.1"):
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(arr[k : k + 1])
        sl.SetSpacing(spacing)
        pos = (origin[0], origin[1], origin[2] + k * spacing[2])
        for tag, value in (
            ("0008|0060", "CT"), ("0020|000d", uid + ".0"), ("0020|000e", uid),
            ("0020|0032", "\\".join(map(str, pos))), ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0028|0030", f"{spacing[1]}\\{spacing[0]}"), ("0018|0050", str(spacing[2])),
            ("0020|0013", str(k + 1)), ("0008|0018", f"{uid}.{k + 1}"),
        ):
            sl.SetMetaData(tag, value)
        sl.SetOrigin(pos)
        writer.SetFileName(str(folder / f"{uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_reads_with_geometry(tmp_path):
    arr = (np.arange(4 * 6 * 5).reshape(4, 6, 5) - 50).astype(np.int16)
    _write_dicom_series(tmp_path / "dcm", arr)
    img = canonicalize(read_image(tmp_path / "dcm"))
    assert np.array_equal(sitk.GetArrayFromImage(img), arr)
    assert np.allclose(img.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)
    assert np.allclose(img.GetOrigin(), (-100.0, -120.0, 50.0), atol=1e-3)


def test_two_dicom_series_in_one_folder_are_rejected(tmp_path):
    arr = np.zeros((2, 4, 4), np.int16)
    _write_dicom_series(tmp_path / "dcm", arr, uid="1.2.826.0.1.3680043.2.1125.1")
    _write_dicom_series(tmp_path / "dcm", arr, uid="1.2.826.0.1.3680043.2.1125.2")
    with pytest.raises(CaseError, match="2 DICOM series"):
        read_image(tmp_path / "dcm")


def test_nrrd_round_trip(tmp_path):
    arr = np.random.default_rng(1).integers(-100, 100, size=(3, 4, 5)).astype(np.int16)
    img = _img(arr, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp_path / "v.nrrd"))
    a = canonicalize(read_image(tmp_path / "v.nrrd"))
    b = canonicalize(img)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert np.allclose(affine_dhw_to_ras(a), affine_dhw_to_ras(b))


def test_label_values_are_checked_before_any_cast(tmp_path):
    sitk.WriteImage(_img(np.zeros((3, 4, 5), np.int16)), str(tmp_path / "img.nii.gz"))
    lab = np.zeros((3, 4, 5), np.int16)
    lab[0, 0, 0], lab[1, 1, 1] = 300, 1  # 300 would wrap to 44 in uint8
    sitk.WriteImage(_img(lab), str(tmp_path / "big.nii.gz"))
    with pytest.raises(CaseError, match=r"big.nii.gz: unexpected label values \[300\]"):
        load_case(CaseSpec("c", tmp_path / "img.nii.gz", tmp_path / "big.nii.gz", None, "pairs"))
    flt = np.zeros((3, 4, 5), np.float32)
    flt[1, 1, 1] = 0.5
    sitk.WriteImage(_img(flt), str(tmp_path / "frac.nii.gz"))
    with pytest.raises(CaseError, match=r"frac.nii.gz: label map holds non-integer values \[0.5\]"):
        load_case(CaseSpec("c", tmp_path / "img.nii.gz", tmp_path / "frac.nii.gz", None, "pairs"))
    # a float label holding whole numbers is fine, and a label map can use values above 255
    flt[1, 1, 1] = 2.0
    sitk.WriteImage(_img(flt), str(tmp_path / "whole.nii.gz"))
    org = sitk.GetArrayFromImage(load_case(CaseSpec("c", tmp_path / "img.nii.gz", tmp_path / "whole.nii.gz", None, "pairs")).organs)
    assert org[1, 1, 1] == 2 and org.sum() == 2
    org = sitk.GetArrayFromImage(load_case(CaseSpec("c", tmp_path / "img.nii.gz", tmp_path / "big.nii.gz", {300: 1}, "pairs")).organs)
    assert org[0, 0, 0] == 1 and org[1, 1, 1] == 0 and org.sum() == 1  # unmapped 1 -> background


def test_oblique_label_is_canonicalised_with_nearest_neighbour():
    c, s_ = np.cos(np.pi / 9), np.sin(np.pi / 9)  # 20 degrees about z
    arr = np.zeros((4, 10, 10), np.int16)
    arr[:, 3:7, 3:7] = 4
    img = _img(arr, spacing=(1, 1, 1), origin=(0, 0, 0), direction=(c, -s_, 0, s_, c, 0, 0, 0, 1))
    lab = sitk.GetArrayFromImage(canonicalize(img, is_label=True))
    assert set(np.unique(lab).tolist()) == {0, 4}
    assert abs(int((lab == 4).sum()) - 4 * 16) <= 4 * 4  # area preserved to within a voxel rim per slice
    smooth = sitk.GetArrayFromImage(canonicalize(img))  # an image: linear, intermediate values appear
    assert np.any((smooth > 0) & (smooth < 4))


def test_source_spacing_follows_canonical_axes(tmp_path):
    arr = np.zeros((4, 5, 6), np.int16)
    img = _img(arr, spacing=(1.0, 2.0, 3.0), direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))  # file x is physical y
    sitk.WriteImage(img, str(tmp_path / "img.nrrd"))
    case = load_case(CaseSpec("c", tmp_path / "img.nrrd", None, None, "pairs"))
    assert case.source_spacing == (2.0, 1.0, 3.0) and np.allclose(case.image.GetSpacing(), (2.0, 1.0, 3.0))
    assert case.organs is None and case.image.GetPixelID() == sitk.sitkFloat32


def test_image_from_array_accepts_bool_masks(tmp_path):
    m = np.zeros((2, 3, 4), bool)
    m[1, 2, 3] = True
    aff = np.diag([-2.0, -1.0, 1.5, 1.0])  # d -> R-L (x2 mm), h -> A-P, w -> S
    write_nifti(m, aff, tmp_path / "m.nii.gz")
    back = canonicalize(read_image(tmp_path / "m.nii.gz"))
    # d runs along R->L (-x in RAS) and is LPS +x; w runs along S: canonical (d,h,w) = (z,y,x) reorders the axes
    idx = np.argwhere(sitk.GetArrayFromImage(back) == 1)[0]
    assert np.allclose(affine_dhw_to_ras(back) @ [*idx, 1], aff @ [1, 2, 3, 1])
