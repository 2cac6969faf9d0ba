"""``lad priors predict``: organ label maps for raw CT, on each input's own grid.

Backends: ``lad`` (a segmenter from ``lad priors train``: resample to its spacing, sliding-window
inference with overlap 0.5, labels resampled back to the input grid with nearest neighbour) and
``totalsegmentator`` (runs the TotalSegmentator package when it and its weights are installed, then
converts its one-file-per-structure output). Outputs ``LABELS/<case_id>.nii.gz`` (the names
``lad prepare --priors`` looks for) and ``LABELS/<case_id>.json`` (organ volumes in ml, flags).
Resumable: finished cases are skipped; every file is written atomically.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from lad.data.labels import ORGAN_LABELS, ORGAN_NAMES, hu_to_unit
from lad.utils.atomic import write_json
from lad.utils.log import get_logger, progress

__all__ = ["predict_priors", "totalseg_to_labelmap", "discover_ct", "MIN_ORGAN_ML"]

log = get_logger(__name__)

# below these volumes an organ is flagged as implausibly small (adult abdomen, generous lower bounds)
MIN_ORGAN_ML = {"liver": 500.0, "kidney": 100.0, "spleen": 40.0, "pancreas": 20.0}
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha")


def discover_ct(input: str | Path, layout: str = "folder") -> list[tuple[str, Path]]:
    """``(case_id, image)`` pairs: a layout of ``lad prepare``, a CSV (``image`` column), or any folder of
    NIfTI/NRRD files and DICOM series sub-folders (``folder``)."""
    path = Path(input)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input does not exist")
    if layout != "folder":
        from lad.data.layouts import discover_cases

        return [(c.case_id, c.image) for c in discover_cases(layout, path)]
    if path.is_file() and path.suffix == ".csv":
        import csv

        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [(Path(r["image"]).name.split(".")[0], (path.parent / r["image"]).resolve()) for r in rows]
    out = []
    for p in sorted(q for q in path.iterdir() if not q.name.startswith(".")):
        if p.is_file() and p.name.endswith(_SUFFIXES):
            name = p.name
            for s in _SUFFIXES:
                name = name.removesuffix(s)
            out.append((name.removesuffix("_0000"), p))
        elif p.is_dir() and any(q.suffix.lower() in (".dcm", "") for q in p.iterdir() if q.is_file()):
            out.append((p.name, p))
    if not out:
        raise ValueError(f"{path}: no CT volumes found (NIfTI/NRRD files or DICOM series folders)")
    return out


def _organ_report(labels: np.ndarray, spacing) -> dict:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=6)
    vols = {ORGAN_NAMES[k]: round(float(counts[k]) * voxel_ml, 2) for k in range(1, 6)}
    flags = []
    for organ, lo in MIN_ORGAN_ML.items():
        if vols[organ] == 0:
            flags.append(f"{organ} missing")
        elif vols[organ] < lo:
            flags.append(f"{organ} implausibly small ({vols[organ]} ml < {lo} ml)")
    return {"organ_volumes_ml": vols, "flags": flags}


def totalseg_to_labelmap(seg_folder: str | Path, reference):
    """TotalSegmentator output (one binary file per structure) -> our label map on ``reference``'s grid."""
    import SimpleITK as sitk

    from lad.data.io import align_label, read_image
    from lad.data.layouts import TOTALSEG_STRUCTURES

    seg_folder = Path(seg_folder)
    arr = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    found = 0
    for structure, organ in TOTALSEG_STRUCTURES.items():
        f = seg_folder / f"{structure}.nii.gz"
        if f.exists():
            lab = align_label(read_image(f), reference, label_path=f, image_path=seg_folder)
            arr[sitk.GetArrayViewFromImage(lab) > 0] = ORGAN_LABELS[organ]
            found += 1
    if not found:
        raise ValueError(f"{seg_folder}: no liver/spleen/kidney/pancreas files (not a TotalSegmentator output folder)")
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(reference)
    return out


def _predict_lad(model, raw, device):
    import SimpleITK as sitk
    import torch

    from lad.data.io import canonicalize
    from lad.data.prepare import _resample

    can = sitk.Cast(canonicalize(raw), sitk.sitkFloat32)
    res = _resample(can, tuple(model.config["spacing"]), sitk.sitkLinear, -1000.0)
    x = torch.from_numpy(hu_to_unit(sitk.GetArrayFromImage(res))[None, None]).to(device)
    pred = model.predict(x)[0].cpu().numpy().astype(np.uint8)
    lab = sitk.GetImageFromArray(pred)
    lab.CopyInformation(res)
    # back to the input's own grid and orientation
    return sitk.Resample(lab, raw, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def _predict_totalseg(raw_path: Path, raw, device: str):
    import SimpleITK as sitk

    exe = shutil.which("TotalSegmentator")
    with tempfile.TemporaryDirectory() as tmp:
        src = raw_path
        if raw_path.is_dir() or not raw_path.name.endswith((".nii", ".nii.gz")):
            src = Path(tmp) / "ct.nii.gz"
            sitk.WriteImage(raw, str(src))
        cmd = [exe, "-i", str(src), "-o", str(Path(tmp) / "seg"), "--roi_subset", "liver", "spleen", "kidney_left",
               "kidney_right", "pancreas", "--device", "gpu" if device.startswith("cuda") else "cpu"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{raw_path}: TotalSegmentator failed: {r.stderr.strip()[-500:]}")
        return totalseg_to_labelmap(Path(tmp) / "seg", raw)


def predict_priors(input: str | Path, out: str | Path, *, segmenter: str | Path | None = None, backend: str = "lad",
                   layout: str = "folder", device: str = "cpu", overwrite: bool = False, progress_bar: bool = True) -> dict:
    """Predict label maps for every CT of ``input`` into ``out``; returns a summary."""
    import SimpleITK as sitk

    from lad.data.io import CaseError, check_ct, read_image, write_image

    if backend == "totalsegmentator":
        if importlib.util.find_spec("totalsegmentator") is None or shutil.which("TotalSegmentator") is None:
            raise ValueError("the totalsegmentator backend needs the TotalSegmentator package and its weights on this machine: "
                             "`pip install TotalSegmentator`, then download its weights (see its README); nothing was done")
        model = None
    elif backend == "lad":
        if segmenter is None:
            raise ValueError("--segmenter SEGMENTER_DIR is required with the lad backend (train one with `lad priors train`)")
        import torch

        from lad.priors.segmenter import Segmenter

        seg_dir = Path(segmenter)
        seg_dir = seg_dir / "model" if (seg_dir / "model").is_dir() else seg_dir
        model = Segmenter.from_pretrained(seg_dir, map_location=device).to(torch.device(device)).eval()
    else:
        raise ValueError(f"--backend must be lad or totalsegmentator, got {backend!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = discover_ct(input, layout)
    done, skipped, failed = 0, 0, []
    for cid, path in progress(cases, desc="priors", unit="case", disable=not progress_bar):
        target = out / f"{cid}.nii.gz"
        if target.exists() and (out / f"{cid}.json").exists() and not overwrite:
            skipped += 1
            continue
        try:
            raw = read_image(path)
            check_ct(raw, path)
        except CaseError as e:
            failed.append({"case": cid, "reason": str(e)})
            log.warning("%s", e)
            continue
        lab = _predict_lad(model, raw, device) if model is not None else _predict_totalseg(Path(path), raw, device)
        write_image(lab, target)
        report = _organ_report(sitk.GetArrayFromImage(lab), lab.GetSpacing())
        write_json(out / f"{cid}.json", {"case": cid, "image": str(path), "backend": backend,
                                         "segmenter": str(segmenter) if segmenter else None, **report})
        done += 1
    summary = {"predicted": done, "skipped": skipped, "failed": failed, "out": str(out)}
    write_json(out / "priors_summary.json", summary)
    return summary
