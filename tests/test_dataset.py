"""``PreparedDataset``: the item contract of docs/contracts.md, splits, lazy memory maps, errors."""

from __future__ import annotations

import json
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import write_prepared
from lad.data import PreparedDataset
from lad.data.prepare import export_window


@pytest.fixture()
def prepared(tmp_path):
    return write_prepared(tmp_path / "prep", patients=3, windows=2, test_patients=1)


def test_item_contract_dtypes_shapes_ranges(prepared):
    ds = PreparedDataset(prepared, split="train")
    assert len(ds) == 4 and ds.shape == (8, 32, 32)
    assert {w["patient"] for w in ds.windows} == {"p00", "p01"}
    item = ds[1]
    assert set(item) == {"image", "mask", "organs", "affine", "meta"}
    assert item["image"].shape == (1, 8, 32, 32) and item["image"].dtype == np.float32
    assert item["mask"].shape == (1, 8, 32, 32) and item["mask"].dtype == np.uint8
    assert item["organs"].shape == (1, 8, 32, 32) and item["organs"].dtype == np.uint8
    assert item["affine"].shape == (4, 4) and item["affine"].dtype == np.float64
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert set(np.unique(item["mask"])) <= {0, 1, 2} and set(np.unique(item["organs"])) <= {0, 4, 5}
    # values: (HU + 1000) / 1400 of the stored int16 window
    hu = np.load(prepared / "patients" / "p00" / "image.npy")[1]
    np.testing.assert_allclose(item["image"][0], (hu.astype(np.float32) + 1000) / 1400, atol=1e-6)
    assert item["image"][0][hu == -1000].max() == 0.0
    assert item["meta"]["id"] == "p00_w001" and item["meta"]["z_range"] == [8, 16]
    # the Lad mask and the organ map agree: organ (1) <-> pancreas (4), tumour (2) <-> 5
    assert np.array_equal(item["mask"] == 1, item["organs"] == 4) and np.array_equal(item["mask"] == 2, item["organs"] == 5)


def test_splits_and_options(prepared):
    train, test, every = (PreparedDataset(prepared, split=s) for s in ("train", "test", None))
    assert len(train) + len(test) == len(every) == 6
    assert not {w["patient"] for w in train.windows} & {w["patient"] for w in test.windows}
    assert every.config["depth"] == 8 and every.fingerprint["window_shape"] == [8, 32, 32]
    light = PreparedDataset(prepared, split="test", organ_labels=False)
    item = light[0]
    assert "organs" not in item and np.array_equal(item["mask"], test[0]["mask"])
    with pytest.raises(ValueError, match="split must be"):
        PreparedDataset(prepared, split="val")
    with pytest.raises(IndexError):
        train[len(train)]


def test_lazy_memory_maps_pickle_and_collate(prepared):
    ds = PreparedDataset(prepared, split=None)
    assert ds._arrays == {}
    ds[0]
    assert list(ds._arrays) == ["p00"] and isinstance(ds._arrays["p00"]["image"], np.memmap)
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets: maps re-opened there
    assert clone._arrays == {} and np.array_equal(clone[3]["image"], ds[3]["image"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 1, 8, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].dtype == torch.uint8 and batch["affine"].shape == (3, 4, 4)
    assert list(batch["meta"]["id"]) == ["p00_w000", "p00_w001", "p01_w000"]


def test_affine_matches_exported_nifti(prepared, tmp_path):
    ds = PreparedDataset(prepared, split=None)
    i = ds.index_of("p01_w001")
    item = ds[i]
    paths = export_window(prepared, "p01_w001", tmp_path / "exp")
    # NIfTI stores (x, y, z) = (w, h, d): the same voxels, axes reversed
    nii = nib.load(paths["image"])
    hu = np.asarray(nii.dataobj)
    assert hu.dtype == np.int16 and nii.shape == (32, 32, 8)
    np.testing.assert_array_equal(hu.transpose(2, 1, 0), np.load(prepared / "patients" / "p01" / "image.npy")[1])
    for key in ("mask", "organs"):
        arr = np.asarray(nib.load(paths[key]).dataobj).transpose(2, 1, 0)
        np.testing.assert_array_equal(arr, item[key][0])
    # voxel (d, h, w) -> the same mm in both: the conftest window has x = -12 w, y = -12 h, z = 10 d + 80 (RAS)
    for dhw in [(0, 0, 0), (7, 31, 0), (3, 5, 17)]:
        mm = nii.affine @ [*dhw[::-1], 1]
        np.testing.assert_allclose(mm[:3], (item["affine"] @ [*dhw, 1])[:3], atol=1e-4)
        np.testing.assert_allclose(mm[:3], [-12 * dhw[2], -12 * dhw[1], 10 * dhw[0] + 80], atol=1e-4)
    with pytest.raises(KeyError, match="no window"):
        export_window(prepared, "p99_w000", tmp_path / "x")


def test_not_a_prepared_dataset(tmp_path, prepared):
    with pytest.raises(ValueError, match="no manifest.json"):
        PreparedDataset(tmp_path / "prep" / "patients")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PreparedDataset(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a lad prepared-dataset manifest"):
        PreparedDataset(tmp_path / "other")
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "lad-prepared", "windows": []}))
    with pytest.raises(ValueError, match="missing"):
        PreparedDataset(tmp_path / "other")
    (tmp_path / "other" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt manifest"):
        PreparedDataset(tmp_path / "other")
    shutil.rmtree(prepared / "patients" / "p02")
    ds = PreparedDataset(prepared, split="test")
    with pytest.raises(ValueError, match="p02"):
        ds[0]


def test_mixed_window_shapes_refused(tmp_path):
    root = write_prepared(tmp_path / "odd", patients=2, odd_shape_patient="p01")
    ds = PreparedDataset(root, split=None)
    assert ds[0]["image"].shape == (1, 8, 32, 32)
    with pytest.raises(ValueError, match="mixed shapes"):
        ds[2]
