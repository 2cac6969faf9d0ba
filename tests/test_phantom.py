"""The embedded phantom: reproducible, realistic HU per organ, anatomically oriented, NIfTI layout."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from lad.data.io import affine_dhw_to_ras, canonicalize, read_image
from lad.data.phantom import generate_subject, write_phantom_dataset
from lad.utils.atomic import OutputExistsError

SMALL = dict(spacing=(4.0, 4.0, 5.0), size=(96, 96))
TINY = dict(spacing=(6.0, 6.0, 5.0), size=(64, 64))


@pytest.fixture(scope="module")
def subject():
    return generate_subject(3, tumor=True, lesions=False, **SMALL)


def test_reproducible_and_independent_of_n(tmp_path):
    a = generate_subject(11, **SMALL)
    b = generate_subject(11, **SMALL)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(generate_subject(12, **SMALL).labels.shape, a.labels.shape) or not np.array_equal(
        generate_subject(12, **SMALL).hu, a.hu)
    write_phantom_dataset(tmp_path / "n2", 2, seed=5, **TINY)
    write_phantom_dataset(tmp_path / "n3", 3, seed=5, workers=2, **TINY)
    for name in ("Case_00002_0000.nii.gz", "Case_00002.nii.gz"):
        x = np.asarray(nib.load(tmp_path / "n2" / name).dataobj)
        y = np.asarray(nib.load(tmp_path / "n3" / name).dataobj)
        assert np.array_equal(x, y)


@pytest.mark.parametrize("label,lo,hi", [(1, 50, 70), (3, 40, 60), (4, 30, 50), (5, 10, 35)])
def test_organ_hu_in_documented_range(subject, label, lo, hi):
    assert (subject.labels == label).sum() > 0
    assert lo <= np.median(subject.hu[subject.labels == label]) <= hi
    if label in (3, 4, 5):  # labels match the tissue painted there: no kidney cortex or aorta under them
        assert np.percentile(subject.hu[subject.labels == label], 95) < 110


def test_kidney_cortex_brighter_and_other_tissues(subject):
    kid = subject.hu[subject.labels == 2]
    assert np.percentile(kid, 90) > 140  # cortex, contrast phase
    assert np.median(kid) < np.percentile(kid, 90) - 30  # medulla darker than cortex
    hu = subject.hu.astype(np.float32)
    assert hu.max() > 500  # bone
    assert (hu < -900).mean() > 0.1  # air around the body
    assert ((hu > -150) & (hu < -60)).mean() > 0.03  # fat
    # correlated noise of about 10-20 HU in a homogeneous organ interior
    from scipy import ndimage

    core = ndimage.binary_erosion(subject.labels == 1, iterations=2)
    assert 6 < subject.hu[core].std() < 25


def test_tumour_sits_in_the_pancreas(subject):
    from scipy import ndimage

    tum = subject.labels == 5
    panc = subject.labels == 4
    assert tum.any() and (ndimage.binary_dilation(panc) & tum).any()  # touches the pancreas
    _, n = ndimage.label(tum | panc, structure=np.ones((3, 3, 3)))
    assert n == 1  # tumour and pancreas form one structure: the tumour grew inside it
    # the tumour is not bigger than the organ part it replaced, and it is hypo-dense vs the pancreas
    assert np.median(subject.hu[tum]) < np.median(subject.hu[panc]) - 8


def test_anatomical_orientation_in_ras(tmp_path):
    write_phantom_dataset(tmp_path, 1, seed=2, tumor_fraction=0.0, **SMALL)
    lab = nib.load(tmp_path / "Case_00001.nii.gz")
    arr = np.asarray(lab.dataobj)
    img = np.asarray(nib.load(tmp_path / "Case_00001_0000.nii.gz").dataobj)

    def centroid(mask):
        return (lab.affine @ [*np.argwhere(mask).mean(0), 1])[:3]

    liver, spleen, kidney = centroid(arr == 1), centroid(arr == 3), centroid(arr == 2)
    assert liver[0] > spleen[0]  # RAS +x is the patient's right: the liver is on the right
    spine = centroid((img > 500) & (np.abs(_ras(lab.affine, arr.shape)[0]) < 25))  # vertebral column
    assert spine[1] < liver[1] and spine[1] < kidney[1] + 40  # spine posterior (smaller RAS y)
    # aorta: the largest enhancing (130-220 HU) unlabelled tube within 40 mm of the midline
    from scipy import ndimage

    ras = _ras(lab.affine, arr.shape)
    vessel = (img > 130) & (img < 220) & (arr == 0) & (np.abs(ras[0]) < 40) & (ras[1] > spine[1])
    comp, n = ndimage.label(ndimage.binary_opening(vessel))
    aorta = centroid(comp == 1 + np.argmax(np.bincount(comp.ravel())[1:]))
    assert aorta[1] > spine[1] + 15  # the spine lies posterior to the aorta
    assert abs(aorta[0]) < 30 and abs(aorta[2] - spine[2]) < 60
    kid_pts = (lab.affine @ np.c_[np.argwhere(arr == 2), np.ones((arr == 2).sum())].T)[2]
    liv_pts = (lab.affine @ np.c_[np.argwhere(arr == 1), np.ones((arr == 1).sum())].T)[2]
    assert liv_pts.max() > kid_pts.min()  # liver dome above the kidneys' lower poles
    # lad's reader returns generate_subject's arrays exactly
    subj = generate_subject(__import__("lad.utils.seed", fromlist=["derive_seed"]).derive_seed(2, 0), tumor_fraction=0.0, **SMALL)
    back = canonicalize(read_image(tmp_path / "Case_00001_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(back), subj.hu)
    assert np.allclose(affine_dhw_to_ras(back), subj.affine)
    assert np.allclose(back.GetSpacing(), (4.0, 4.0, 5.0))


def _ras(affine, shape):
    """RAS mm coordinates (3, D, H, W) of every voxel."""
    idx = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:]).reshape(3, *shape)


def test_tiny_grid_keeps_every_organ():
    s = generate_subject(1, spacing=(12.0, 12.0, 10.0), size=(32, 32), tumor=True)
    counts = np.bincount(s.labels.ravel(), minlength=6)
    assert all(counts[k] > 0 for k in (1, 2, 3, 4))
    assert counts[4] >= 8


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_small_phantom_has_every_organ_and_a_thick_pancreas(seed):
    from scipy import ndimage

    s = generate_subject(seed, tumor=True, **TINY)
    counts = np.bincount(s.labels.ravel(), minlength=6)
    assert all(counts[k] > 0 for k in (1, 2, 3, 4, 5)) and s.has_tumor
    assert ndimage.binary_erosion(s.labels == 4).any()  # at least 3 voxels across in every direction somewhere
    # the two kidneys are two separate bodies either side of the midline (RAS x of opposite sign)
    comp, n = ndimage.label(s.labels == 2)
    big = np.argsort(np.bincount(comp.ravel())[1:])[::-1][:2] + 1
    assert n >= 2 and (np.isin(comp, big) | (comp == 0)).mean() > 0.999  # two bodies (+ stray voxels)
    xs = sorted((s.affine @ [*np.argwhere(comp == k).mean(0), 1])[0] for k in big)
    assert xs[0] < -20 and xs[1] > 20
    # the volume covers the liver dome and the kidneys' lower poles with a margin (first/last slices free)
    z_liver = np.flatnonzero((s.labels == 1).any(axis=(1, 2)))
    z_kid = np.flatnonzero((s.labels == 2).any(axis=(1, 2)))
    assert z_kid.min() > 0 and z_liver.max() <= s.labels.shape[0] - 1
    no = generate_subject(seed, tumor=False, **TINY)
    assert not no.has_tumor and not (no.labels == 5).any()


def test_cli_writes_layout_and_refuses_existing(tmp_path, capsys):
    from lad.cli import main

    out = tmp_path / "ph"
    argv = ["phantom", str(out), "--n", "2", "--seed", "1", "--spacing", "6", "6", "5", "--size", "64", "64",
            "--preview", "--no-progress"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Case_00001.nii.gz", "Case_00001_0000.nii.gz", "Case_00002.nii.gz", "Case_00002_0000.nii.gz", "preview.png"]
    img = nib.load(out / "Case_00001_0000.nii.gz")
    assert img.get_data_dtype() == np.int16 and nib.load(out / "Case_00001.nii.gz").get_data_dtype() == np.uint8
    assert np.allclose(img.header.get_zooms(), (6.0, 6.0, 5.0))  # NIfTI axes (x, y, z) = (W, H, D)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # LPS-ordered grid, RAS world: read back correctly
    from PIL import Image

    w, h = Image.open(out / "preview.png").size
    assert w > 400 and h > 200
    capsys.readouterr()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(OutputExistsError):
        write_phantom_dataset(out, 1)
    assert main([*argv[:-2], "--n", "1", "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Case_00001.nii.gz", "Case_00001_0000.nii.gz"]


def test_invalid_arguments_name_the_option(tmp_path):
    for kwargs, flag in (({"tumor_fraction": 1.5}, "--tumor-fraction"), ({"workers": 0}, "--workers"),
                         ({"spacing": (1.0, 0.0, 1.0)}, "--spacing")):
        with pytest.raises(ValueError, match=flag):
            write_phantom_dataset(tmp_path / "x", 1, **kwargs)
    with pytest.raises(ValueError, match="--n"):
        write_phantom_dataset(tmp_path / "x", 0)
