"""A prepared patient's original, whole CT volume on the prepared grid.

``lad prepare`` keeps only windows along the organ of interest; downstream evaluations that need the
whole scan (SSL-ALPNet's test scans, paper section 4.3) read the original case again through the
provenance the prepare manifest records (``source_image`` / ``source_labels`` per window, the layout and
label map in ``prepare_settings.json``) and apply the same preprocessing as ``lad prepare``:
canonical orientation, resampling to the prepared spacing (image linear, labels nearest), the
patient's recorded in-plane crop/pad (``crop_start_hw`` of its ``meta.json``) and the HU clip. Every
slice of the scan is kept, so a window's slices are exactly ``volume[z_range[0]:z_range[1]]``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

__all__ = ["OriginalCase", "OriginalCaseError", "read_original_case"]


class OriginalCaseError(FileNotFoundError):
    """The original case of a prepared patient cannot be read; the message starts with the offending file."""


@dataclasses.dataclass
class OriginalCase:
    """``hu`` int16 (D, H, W) HU clipped to the prepare ``hu_clip``; ``organs`` uint8 (D, H, W) organ label map
    (0 bg, 1 liver, 2 kidney, 3 spleen, 4 pancreas, 5 tumour); ``affine`` (4, 4) ``(d, h, w, 1)`` -> RAS mm."""

    patient: str
    hu: np.ndarray
    organs: np.ndarray
    affine: np.ndarray
    source_image: str


def _case_spec(settings: dict, window: dict, patient: str):
    from lad.data.layouts import CaseSpec, _totalseg_subject, parse_label_map

    layout = settings.get("layout")
    image = Path(window["source_image"])
    labels = Path(window["source_labels"])
    if layout == "totalsegmentator":
        spec = _totalseg_subject(image.parent) if image.exists() else None
        if spec is None:
            raise OriginalCaseError(f"{image}: file not found (original CT of prepared patient {patient})")
        return spec
    if window.get("labels_are_predictions"):
        label_map = None
    elif layout == "msd":
        from lad.data.labels import ORGAN_LABELS

        label_map = {1: ORGAN_LABELS["pancreas"], 2: ORGAN_LABELS["tumor"]}
    elif layout == "pairs" and settings.get("label_map"):
        label_map = parse_label_map(settings["label_map"])
    else:
        label_map = None
    return CaseSpec(patient, image, labels, label_map, layout or "abdomenct1k", bool(window.get("labels_are_predictions")))


def read_original_case(prepared: str | Path, patient: str) -> OriginalCase:
    """The whole original CT of ``patient`` of the prepared dataset ``prepared``, preprocessed as its windows were.

    Raises ``OriginalCaseError`` (a ``FileNotFoundError``) naming the file when the original image or labels are
    not where the manifest says (moved or deleted) or unreadable, and ``ValueError`` when the re-read case does
    not reproduce the prepared grid (the files changed since ``lad prepare``).
    """
    import SimpleITK as sitk

    from lad.data.io import CaseError, affine_dhw_to_ras, load_case
    from lad.data.labels import HU_MAX, HU_MIN
    from lad.data.prepare import _crop_pad_hw, _resample, _translate

    prepared = Path(prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    windows = [w for w in manifest["windows"] if w["patient"] == patient]
    if not windows:
        raise KeyError(f"{prepared}: no prepared patient {patient!r}")
    sfile = prepared / "prepare_settings.json"
    settings = json.loads(sfile.read_text()) if sfile.exists() else {"layout": manifest.get("layout")}
    meta_file = prepared / "patients" / patient / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if "crop_start_hw" not in meta:
        raise ValueError(f"{meta_file}: no crop_start_hw recorded (not written by `lad prepare`); the original case "
                         f"of {patient} cannot be placed on the prepared grid")
    cfg = manifest["config"]
    spec = _case_spec(settings, windows[0], patient)
    for f in [spec.image] + ([spec.labels] if isinstance(spec.labels, Path) else list((spec.labels or {}).values())):
        if not Path(f).exists():
            raise OriginalCaseError(f"{f}: file not found (original {'CT' if f == spec.image else 'labels'} of prepared "
                                    f"patient {patient}, recorded in {prepared / 'manifest.json'})")
    try:
        case = load_case(spec)
    except CaseError as e:
        raise OriginalCaseError(str(e)) from None
    if case.organs is None:
        raise OriginalCaseError(f"{windows[0]['source_labels']}: no labels found (labels of prepared patient {patient})")
    image = _resample(case.image, cfg["spacing"], sitk.sitkLinear, HU_MIN)
    organs = _resample(case.organs, cfg["spacing"], sitk.sitkNearestNeighbor, 0)
    hu = sitk.GetArrayFromImage(image)
    lab = sitk.GetArrayFromImage(organs).astype(np.uint8)
    if "resampled_shape" in meta and list(hu.shape) != list(meta["resampled_shape"]):
        raise ValueError(f"{spec.image}: resampled to {list(hu.shape)} voxels, but `lad prepare` recorded "
                         f"{meta['resampled_shape']} ({meta_file}): the original file changed since it was prepared")
    sh, sw = (int(v) for v in meta["crop_start_hw"])
    size = tuple(int(v) for v in cfg["size"])
    lo, hi = cfg.get("hu_clip", (HU_MIN, HU_MAX))
    hu = _crop_pad_hw(np.clip(np.rint(hu), lo, hi).astype(np.int16), sh, sw, size, np.int16(lo))
    lab = _crop_pad_hw(lab, sh, sw, size, np.uint8(0))
    return OriginalCase(patient=patient, hu=hu, organs=lab, affine=_translate(affine_dhw_to_ras(image), 0, sh, sw),
                        source_image=str(spec.image))
