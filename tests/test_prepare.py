"""`lad prepare`: geometry survives every step, windows follow the organ, resume, drops, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from lad.data.dataset import PreparedDataset
from lad.data.prepare import PrepareConfig, export_window, prepare_dataset, window_starts
from lad.utils.atomic import OutputExistsError

REAL = Path("/work/shared/data/real-ct/patient-a")
for _p in Path(__file__).resolve().parents:
    if (_p / "shared" / "data" / "real-ct" / "patient-a").exists():
        REAL = _p / "shared" / "data" / "real-ct" / "patient-a"
        break

CFG = PrepareConfig(spacing=(4.0, 4.0, 4.0), size=(32, 32), depth=8, stride=4)


def _case(folder: Path, name: str, *, centre_mm=(10.0, -30.0, 60.0), organs=("liver", "kidney", "spleen", "pancreas"),
          n_slices=30, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1), nan=False):
    """A 2 mm volume whose pancreas is a cube centred at ``centre_mm`` (LPS), plus other organ blocks."""
    shape = (n_slices, 48, 48)
    img = sitk.GetImageFromArray(np.full(shape, -100, np.int16))
    img.SetSpacing((2.0, 2.0, 2.0))
    img.SetDirection(direction)
    img.SetOrigin((40.0, -80.0, 0.0))
    lab = np.zeros(shape, np.uint8)
    arr = np.full(shape, -100.0, np.float32)
    arr[:, 4:44, 4:44] = 30.0  # body
    blocks = {"liver": ((2, 28), (6, 20), (6, 20)), "kidney": ((2, 28), (30, 40), (6, 14)), "spleen": ((2, 28), (30, 40), (30, 40))}
    for organ, (zs, ys, xs) in blocks.items():
        if organ in organs:
            lab[slice(*zs), slice(*ys), slice(*xs)] = {"liver": 1, "kidney": 2, "spleen": 3}[organ]
            arr[slice(*zs), slice(*ys), slice(*xs)] = {"liver": 60, "kidney": 150, "spleen": 50}[organ]
    if "pancreas" in organs:
        idx = img.TransformPhysicalPointToIndex(centre_mm)  # (x, y, z)
        x, y, z = idx
        lab[z - 2 : z + 3, y - 2 : y + 3, x - 2 : x + 3] = 4
        arr[z - 2 : z + 3, y - 2 : y + 3, x - 2 : x + 3] = 40.0
    if nan:
        arr[0, 0, 0] = np.nan
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(img)
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(img)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{name}_0000.nii.gz"))
    sitk.WriteImage(labels, str(folder / f"{name}.nii.gz"))


def test_window_starts_cover_the_organ():
    assert window_starts(10, 12, 8, 4, 40) == [7]  # short organ: one centred window
    starts = window_starts(5, 30, 8, 4, 40)
    assert starts[0] == 5 and starts[-1] + 8 - 1 == 30
    assert all(b - a <= 4 for a, b in zip(starts, starts[1:]))
    assert window_starts(0, 3, 8, 4, 8) == [0]  # clipped to the volume


def test_geometry_survives_prepare_and_export(tmp_path):
    centre = (10.0, -30.0, 30.0)  # LPS mm
    _case(tmp_path / "raw", "Case_00001", centre_mm=centre)
    s = prepare_dataset("abdomenct1k", tmp_path / "raw", tmp_path / "prep", CFG)
    assert s["kept"] == 1 and s["windows_train"] >= 1
    ds = PreparedDataset(tmp_path / "prep", split=None)
    item = ds[0]
    assert item["image"].shape == (1, 8, 32, 32) and item["image"].dtype == np.float32
    assert item["mask"].dtype == np.uint8 and set(np.unique(item["mask"])) <= {0, 1}
    # pancreas centre through the window's affine, in RAS mm
    d, h, w = np.argwhere(item["mask"][0] == 1).mean(0)
    ras = item["affine"] @ [d, h, w, 1]
    assert np.allclose(ras[:3], [-centre[0], -centre[1], centre[2]], atol=2.5)
    # the exported NIfTI puts it at the same place for nibabel
    paths = export_window(tmp_path / "prep", ds.windows[0]["id"], tmp_path / "exp")
    nii = nib.load(paths["mask"])
    ijk = np.argwhere(np.asarray(nii.dataobj) == 1).mean(0)
    assert np.allclose((nii.affine @ [*ijk, 1])[:3], ras[:3], atol=1e-3)
    hu = np.asarray(nib.load(paths["image"]).dataobj)
    assert hu.dtype == np.int16 and abs(np.median(hu[np.asarray(nii.dataobj) == 1]) - 40) < 10


def test_split_by_patient_resume_and_drops(tmp_path):
    raw = tmp_path / "raw"
    for i in range(5):
        _case(raw, f"Case_{i:05d}")
    _case(raw, "Case_00010", organs=("liver", "kidney", "pancreas"))  # no spleen
    _case(raw, "Case_00011", n_slices=3)  # thinner than one window
    _case(raw, "Case_00012", nan=True)  # corrupt values
    cfg = PrepareConfig(spacing=(4.0, 4.0, 4.0), size=(32, 32), depth=8, stride=4, require=["spleen"])
    s = prepare_dataset("abdomenct1k", raw, tmp_path / "prep", cfg)
    assert s["patients"] == 8 and s["kept"] == 5 and s["dropped"] == 3
    man = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    reasons = {d["patient"]: d["reason"] for d in man["dropped"]}
    assert "spleen missing" in reasons["Case_00010"]
    assert "fewer than one window" in reasons["Case_00011"] or "cut short" in reasons["Case_00011"]
    assert "NaN" in reasons["Case_00012"]
    train = set(man["splits"]["train"])
    test = set(man["splits"]["test"])
    assert not train & test and train | test == {f"Case_{i:05d}" for i in range(5)}
    assert {w["patient"] for w in man["windows"] if w["split"] == "train"} <= train
    fp = json.loads((tmp_path / "prep" / "fingerprint.json").read_text())
    assert 30 <= fp["hu_percentiles_per_organ"]["pancreas"]["50"] <= 50
    # resume: a finished patient is not recomputed; a half-written temp folder is ignored
    meta = tmp_path / "prep" / "patients" / "Case_00000" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    # Case_00004 interrupted mid-write: only its temporary folder (with a stale, wrong array) is left
    patients = tmp_path / "prep" / "patients"
    (patients / "Case_00004").rename(patients / ".Case_00004.abc.tmp")
    (patients / ".Case_00004.abc.tmp" / "meta.json").unlink()
    np.save(patients / ".Case_00004.abc.tmp" / "image.npy", np.zeros((1, 2, 2, 2), np.int16))
    s2 = prepare_dataset("abdomenct1k", raw, tmp_path / "prep", cfg)
    assert s2["kept"] == 5 and meta.stat().st_mtime_ns == stamp
    assert (patients / "Case_00004" / "meta.json").exists() and not list(patients.glob(".*"))
    assert np.load(patients / "Case_00004" / "image.npy").shape[1:] == (8, 32, 32)
    assert json.loads((tmp_path / "prep" / "manifest.json").read_text())["windows"] == man["windows"]
    assert len(PreparedDataset(tmp_path / "prep", split=None)) == len(man["windows"])
    # other settings on the same folder are refused, nothing lost
    with pytest.raises(OutputExistsError, match=r"spacing: \[4.0, 4.0, 4.0\] -> \[5.0, 5.0, 5.0\].*--overwrite"):
        prepare_dataset("abdomenct1k", raw, tmp_path / "prep", PrepareConfig(spacing=(5.0, 5.0, 5.0), size=(32, 32), depth=8))
    assert meta.exists()


def test_real_ct_totalsegmentator(tmp_path):
    # the example scan stops in the upper abdomen: the paper's completeness filter drops it
    strict = PrepareConfig(spacing=(3.0, 3.0, 3.0), size=(96, 96), depth=8, stride=4, require=["liver", "kidney", "spleen", "pancreas"])
    s = prepare_dataset("totalsegmentator", REAL, tmp_path / "strict", strict)
    assert s["kept"] == 0
    reason = json.loads((tmp_path / "strict" / "manifest.json").read_text())["dropped"][0]["reason"]
    assert "liver cut short" in reason
    cfg = PrepareConfig(spacing=(3.0, 3.0, 3.0), size=(96, 96), depth=8, stride=4, require=["kidney", "pancreas"])
    s = prepare_dataset("totalsegmentator", REAL, tmp_path / "prep", cfg)
    assert s["kept"] == 1
    ds = PreparedDataset(tmp_path / "prep", split=None)
    assert len(ds) >= 1
    liver_hu = []
    for i in range(len(ds)):
        r = ds.get_arrays(i)
        assert r["hu"].shape == (8, 96, 96)
        assert (r["mask"] == 1).any()  # pancreas present in each window
        liver_hu.append(r["hu"][r["organs"] == 1])
    liver = np.concatenate(liver_hu)
    assert liver.size > 0 and 20 < liver.mean() < 120


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)
    with pytest.raises(FileNotFoundError):
        PreparedDataset(tmp_path / "nope")


def test_cli_prepare_and_export(tmp_path):
    _case(tmp_path / "raw", "Case_00001")
    cmd = [sys.executable, "-m", "lad", "prepare", "--layout", "abdomenct1k", "--input", str(tmp_path / "raw"),
           "--output", str(tmp_path / "prep"), "--preset", "tiny", "--spacing", "4", "4", "4", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert out.returncode == 0, out.stderr
    assert "prepared 1/1 patients" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "lad", "prepare", "--layout", "abdomenct1k", "--input", str(tmp_path / "raw"),
                          "--output", str(tmp_path / "prep"), "--preset", "nope"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert bad.returncode == 2 and "unknown prepare preset 'nope'" in bad.stderr
    wid = json.loads((tmp_path / "prep" / "manifest.json").read_text())["windows"][0]["id"]
    out = subprocess.run([sys.executable, "-m", "lad", "export-window", str(tmp_path / "prep"), wid, "--out", str(tmp_path / "e")],
                         capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert out.returncode == 0 and (tmp_path / "e" / f"{wid}_image.nii.gz").exists()
    for verb in ("prepare", "export-window", "phantom", "sample"):
        h = subprocess.run([sys.executable, "-m", "lad", verb, "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace")
        assert h.returncode == 0 and "usage: lad" in h.stdout


def _oblique_axes_case(folder: Path, name: str, cube_index=(12, 20, 9)):
    """A volume stored with permuted, flipped axes, anisotropic spacing and an odd origin.

    Index axis i runs to +P, j to -S, k to -L (a det +1 signed permutation); a bright 4^3 cube of
    pancreas sits at ``cube_index`` (i, j, k). Returns the cube's centre in LPS mm (the oracle).
    """
    size = (28, 36, 30)  # (i, j, k)
    arr = np.full(size[::-1], 30.0, np.float32)  # numpy (k, j, i); soft tissue everywhere
    lab = np.zeros(size[::-1], np.uint8)
    i, j, k = cube_index
    arr[k : k + 4, j : j + 4, i : i + 4] = 300.0
    lab[k : k + 4, j : j + 4, i : i + 4] = 4
    lab[2:28, 2:34, 2:8] = 1  # a liver block away from the cube
    image, labels = sitk.GetImageFromArray(arr), sitk.GetImageFromArray(lab)
    for im in (image, labels):
        im.SetSpacing((2.5, 3.0, 2.0))
        im.SetDirection((0, 0, -1, 1, 0, 0, 0, -1, 0))
        im.SetOrigin((37.5, -112.25, 301.0))
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{name}_0000.nii.gz"))
    sitk.WriteImage(labels, str(folder / f"{name}.nii.gz"))
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([i + 1.5, j + 1.5, k + 1.5]))


def test_geometry_permuted_axes_to_ras_mm(tmp_path):
    centre_lps = _oblique_axes_case(tmp_path / "raw", "Case_00007")
    centre_ras = centre_lps * [-1, -1, 1]
    cfg = PrepareConfig(spacing=(2.0, 2.0, 2.0), size=(48, 48), depth=8, stride=4)
    s = prepare_dataset("abdomenct1k", tmp_path / "raw", tmp_path / "prep", cfg)
    assert s["kept"] == 1
    ds = PreparedDataset(tmp_path / "prep", split=None)
    for i, w in enumerate(ds.windows):
        paths = export_window(tmp_path / "prep", w["id"], tmp_path / "exp")
        nii = nib.load(paths["image"])
        hu = np.asarray(nii.dataobj)
        bright = np.argwhere(hu > 200)
        assert len(bright) > 0  # the cube is in every window (it is the organ of interest)
        # exported NIfTI: the whole cube (when fully inside) is centred where it was in the source, in RAS mm
        if w["organ_voxels"]["pancreas"] >= 0.9 * (4 * 2.5 * 4 * 3.0 * 4 * 2.0) / 8:
            got = (nii.affine @ [*bright.mean(0), 1])[:3]
            np.testing.assert_allclose(got, centre_ras, atol=1.0)
        # the dataset's affine (d, h, w) agrees with nibabel's (x, y, z) = (w, h, d)
        d, h, w_ = np.argwhere(ds[i]["mask"][0] == 1)[0]
        np.testing.assert_allclose(ds[i]["affine"] @ [d, h, w_, 1], nii.affine @ [w_, h, d, 1], atol=1e-4)
    # canonical orientation: row 0 anterior, column 0 patient right, slice 0 inferior
    a = np.asarray(ds.windows[0]["affine"])
    assert a[2, 0] > 0 and a[1, 1] < 0 and a[0, 2] < 0


def test_phantom_end_to_end_workers_and_split(tmp_path):
    from lad.data.phantom import write_phantom_dataset
    from lad.data.prepare import load_prepare_config, split_patients

    write_phantom_dataset(tmp_path / "raw", 4, seed=3, spacing=(6.0, 6.0, 5.0), size=(64, 64))
    cfg = load_prepare_config("tiny", {"split": 0.75})
    s1 = prepare_dataset("abdomenct1k", tmp_path / "raw", tmp_path / "one", cfg)
    s2 = prepare_dataset("abdomenct1k", tmp_path / "raw", tmp_path / "two", cfg, workers=2)
    m1, m2 = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("one", "two"))
    assert s1["kept"] == 4 and m1["windows"] == m2["windows"] and m1["splits"] == m2["splits"]
    assert len(m1["splits"]["train"]) == 3 and len(m1["splits"]["test"]) == 1
    ds = PreparedDataset(tmp_path / "one", split=None)
    for i in range(len(ds)):
        r = ds.get_arrays(i)
        assert r["hu"].shape == (8, 32, 32) and r["hu"].dtype == np.int16
        assert r["hu"].min() >= -1000 and r["hu"].max() <= 400
        assert (r["mask"] == 1).any() or (r["mask"] == 2).any()  # each window holds the organ of interest
        z0, z1 = r["meta"]["z_range"]
        assert z1 - z0 == 8
    fp = json.loads((tmp_path / "one" / "fingerprint.json").read_text())
    assert fp["n_windows"]["train"] == s1["windows_train"] and fp["window_shape"] == [8, 32, 32]
    assert fp["source_spacing"]["median"] == [6.0, 6.0, 5.0]
    assert fp["hu_percentiles"]["0.5"] <= fp["hu_percentiles"]["50"] <= fp["hu_percentiles"]["99.5"]
    n_train_vox = sum(int((PreparedDataset(tmp_path / "one")[i]["organs"] == 1).sum()) for i in range(s1["windows_train"]))
    assert fp["label_voxels"]["liver"] == n_train_vox
    # the split depends only on the sorted ids and the seed
    ids = [f"Case_{i:05d}" for i in range(1, 5)]
    assert split_patients(ids[::-1], 0.75, 0) == split_patients(ids, 0.75, 0) == {
        p: ("train" if p in m1["splits"]["train"] else "test") for p in ids}


def test_drops_missing_organ_unlabeled_and_bad_layout(tmp_path):
    raw = tmp_path / "raw"
    _case(raw, "Case_00001")
    _case(raw, "Case_00002", organs=("liver", "kidney", "spleen"))  # no pancreas
    _case(raw, "Case_00003")
    (raw / "Case_00003.nii.gz").unlink()  # unlabeled, no priors
    (raw / "Case_00004_0000.nii.gz").write_bytes(b"not a nifti")  # unreadable
    s = prepare_dataset("abdomenct1k", raw, tmp_path / "prep", CFG)
    assert s["kept"] == 1 and s["dropped"] == 3
    dropped = {d["patient"]: d for d in json.loads((tmp_path / "prep" / "manifest.json").read_text())["dropped"]}
    assert "pancreas not present" in dropped["Case_00002"]["reason"] and dropped["Case_00002"]["file"].endswith("Case_00002.nii.gz")
    assert "unlabeled" in dropped["Case_00003"]["reason"]
    assert dropped["Case_00004"]["file"].endswith("Case_00004_0000.nii.gz") and "unreadable" in dropped["Case_00004"]["reason"]
    with pytest.raises(ValueError, match="unknown layout 'nifti'"):
        prepare_dataset("nifti", raw, tmp_path / "p2", CFG)
    with pytest.raises(ValueError, match="hu_clip"):
        PrepareConfig(hu_clip=(-1200, 400))
    with pytest.raises(ValueError, match="require"):
        PrepareConfig(require=["lung"])


def test_presets_and_overrides():
    from lad.data.prepare import load_prepare_config

    paper = load_prepare_config("paper-abdomenct1k")
    assert paper.spacing == (1.6, 1.6, 2.3) and paper.size == (256, 256) and paper.depth == 32 and paper.window_stride == 16
    ts = load_prepare_config("paper-totalsegmentator")
    assert ts.spacing == (1.1, 1.1, 1.5) and ts.require == ["liver", "kidney", "spleen", "pancreas"]
    demo = load_prepare_config("demo", {"depth": 12, "stride": None})
    assert demo.depth == 12 and demo.size == (64, 64) and demo.spacing == (6.0, 6.0, 5.0)
    tiny = load_prepare_config("tiny")
    assert tiny.size == (32, 32) and tiny.depth == 8 and tiny.hu_clip == (-1000.0, 400.0)


def test_one_window_per_case_centred_on_the_organ(tmp_path):
    """windows: one (the paper's, its presets) takes one window per CT centred on the organ's z-extent, where
    sliding windows (demo, tiny) take several overlapping ones."""
    from lad.data.phantom import write_phantom_dataset
    from lad.data.prepare import load_prepare_config

    assert window_starts(5, 30, 8, 4, 40, "one") == [14]  # (5 + 30 + 1) // 2 - 8 // 2: centre of [5, 30]
    assert window_starts(10, 12, 8, 4, 40, "one") == window_starts(10, 12, 8, 4, 40)  # a short organ: the same
    assert window_starts(16, 19, 8, 4, 20, "one") == [12]  # clipped to the volume
    with pytest.raises(ValueError, match="one' or 'sliding"):
        window_starts(5, 30, 8, 4, 40, "every")
    assert load_prepare_config("paper-abdomenct1k").windows == load_prepare_config("paper-totalsegmentator").windows == "one"
    assert load_prepare_config("demo").windows == load_prepare_config("tiny").windows == "sliding"

    write_phantom_dataset(tmp_path / "raw", 2, seed=1, spacing=(6.0, 6.0, 5.0), size=(64, 64))
    counts = {}
    for mode in ("sliding", "one"):
        cfg = load_prepare_config("tiny", {"depth": 2, "stride": 1, "windows": mode})
        prepare_dataset("abdomenct1k", tmp_path / "raw", tmp_path / mode, cfg)
        ds = PreparedDataset(tmp_path / mode, split=None)
        counts[mode] = [w["patient"] for w in ds.windows]
    assert len(counts["sliding"]) > len(set(counts["sliding"]))  # several windows of some case
    assert sorted(counts["one"]) == sorted(set(counts["sliding"]))  # exactly one per case
    # a folder prepared before `windows` existed was prepared with sliding windows: it resumes as such
    settings_file = tmp_path / "sliding" / "prepare_settings.json"
    old = json.loads(settings_file.read_text())
    del old["config"]["windows"]
    settings_file.write_text(json.dumps(old))
    tiny = lambda mode: load_prepare_config("tiny", {"depth": 2, "stride": 1, "windows": mode})
    assert prepare_dataset("abdomenct1k", tmp_path / "raw", tmp_path / "sliding", tiny("sliding"))["kept"] == 2
    with pytest.raises(OutputExistsError, match="windows: 'sliding' -> 'one'"):
        prepare_dataset("abdomenct1k", tmp_path / "raw", tmp_path / "sliding", tiny("one"))
