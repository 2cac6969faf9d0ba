"""Dataset layouts: find the (image, labels) pairs of a folder the way each public dataset stores them.

* ``abdomenct1k``: ``Case_XXXXX_0000.nii.gz`` images + ``Case_XXXXX.nii.gz`` masks (side by side, or in
  ``images/`` + ``labels/`` / ``imagesTr/`` + ``labelsTr/``); labels 1 liver, 2 kidney, 3 spleen,
  4 pancreas (5 tumour: the phantom's extension).
* ``totalsegmentator``: one folder per subject with ``ct.nii.gz`` and ``segmentations/<structure>.nii.gz``
  binary files; kidney = kidney_left | kidney_right.
* ``msd``: Medical Segmentation Decathlon Task07 Pancreas (``imagesTr/``, ``labelsTr/``, ``dataset.json``;
  labels 1 pancreas, 2 tumour); ``imagesTs/`` cases are unlabeled.
* ``pairs``: a CSV with ``image,label`` rows (NIfTI/NRRD files or DICOM series folders) and a
  ``--label-map`` such as ``liver=5,spleen=1,kidney=2+3,pancreas=7,tumor=9``.

``priors=DIR`` supplies predicted label maps (``<case_id>.nii.gz``, our label values) for cases
without ground truth; those cases are marked ``labels_are_predictions``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

from lad.data.labels import ORGAN_LABELS

__all__ = ["CaseSpec", "LAYOUTS", "discover_cases", "parse_label_map", "TOTALSEG_STRUCTURES"]

LAYOUTS = ("abdomenct1k", "totalsegmentator", "msd", "pairs")

# TotalSegmentator structure file -> our organ label name, in organ-label order (liver 1, kidney 2,
# spleen 3, pancreas 4): a voxel claimed by two files takes the LATER entry's label.
TOTALSEG_STRUCTURES: dict[str, str] = {
    "liver": "liver",
    "kidney_left": "kidney",
    "kidney_right": "kidney",
    "kidney": "kidney",
    "spleen": "spleen",
    "pancreas": "pancreas",
}

_NAME_ALIASES = {"tumour": "tumor", "kidneys": "kidney"}


@dataclasses.dataclass
class CaseSpec:
    """Where one case's image and labels are.

    ``labels``: one label-map file, a dict ``{structure file stem: path}`` of binary masks
    (TotalSegmentator), or None (unlabeled). ``label_map``: source value -> organ label (None = ours).
    """

    case_id: str
    image: Path
    labels: Path | dict[str, Path] | None
    label_map: dict[int, int] | None
    layout: str
    labels_are_predictions: bool = False


def parse_label_map(text: str) -> dict[int, int]:
    """``"liver=5,spleen=1,kidney=2+3"`` -> ``{5: 1, 1: 3, 2: 2, 3: 2}`` (source value -> organ label)."""
    out: dict[int, int] = {}
    for token in [t.strip() for t in text.split(",") if t.strip()]:
        m = re.fullmatch(r"([A-Za-z_]+)\s*=\s*([0-9+\s]+)", token)
        if not m:
            raise ValueError(f"--label-map: malformed entry {token!r} (expected organ=value or organ=v1+v2)")
        name = _NAME_ALIASES.get(m.group(1).lower(), m.group(1).lower())
        if name not in ORGAN_LABELS or name == "background":
            raise ValueError(f"--label-map: unknown organ {m.group(1)!r} in {token!r}; known: liver, kidney, spleen, pancreas, tumor")
        for v in m.group(2).split("+"):
            v = int(v.strip())
            if v in out and out[v] != ORGAN_LABELS[name]:
                raise ValueError(f"--label-map: source value {v} mapped twice")
            out[v] = ORGAN_LABELS[name]
    if not out:
        raise ValueError("--label-map: empty")
    return out


def _visible(paths):
    return [p for p in paths if not p.name.startswith((".", "._"))]


def _abdomenct1k(root: Path) -> list[CaseSpec]:
    dirs = [root] + [root / d for d in ("images", "labels", "imagesTr", "labelsTr", "Images", "Masks", "masks") if (root / d).is_dir()]
    images, masks = {}, {}
    for d in dirs:
        for p in _visible(d.glob("*.nii*")):
            m = re.fullmatch(r"(.+)_0000\.nii(\.gz)?", p.name)
            if m:
                images[m.group(1)] = p
            else:
                masks[re.sub(r"\.nii(\.gz)?$", "", p.name)] = p
    return [CaseSpec(cid, images[cid], masks.get(cid), None, "abdomenct1k") for cid in sorted(images)]


def _totalseg_subject(folder: Path) -> CaseSpec | None:
    ct = folder / "ct.nii.gz"
    if not ct.exists():
        return None
    segdir = folder / "segmentations"
    labels: dict[str, Path] | None = None
    if segdir.is_dir():
        found = {s: segdir / f"{s}.nii.gz" for s in TOTALSEG_STRUCTURES if (segdir / f"{s}.nii.gz").exists()}
        if found:
            # the dict maps OUR organ names (several files may give one organ): keep file order stable
            labels = {}
            for s, p in found.items():
                labels.setdefault(TOTALSEG_STRUCTURES[s] + ("" if TOTALSEG_STRUCTURES[s] not in labels else f"#{s}"), p)
    return CaseSpec(folder.name, ct, labels, None, "totalsegmentator")


def _totalsegmentator(root: Path) -> list[CaseSpec]:
    single = _totalseg_subject(root)
    if single is not None:
        return [single]
    out = [c for d in sorted(_visible(root.iterdir())) if d.is_dir() and (c := _totalseg_subject(d))]
    return out


def _msd(root: Path) -> list[CaseSpec]:
    label_map = {1: ORGAN_LABELS["pancreas"], 2: ORGAN_LABELS["tumor"]}
    pairs: list[tuple[Path, Path | None]] = []
    ds = root / "dataset.json"
    if ds.exists():
        try:
            meta = json.loads(ds.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{ds}: corrupt dataset.json ({e})") from None
        for entry in meta.get("training", []):
            pairs.append((root / entry["image"], root / entry["label"]))
        for entry in meta.get("test", []):
            pairs.append((root / (entry if isinstance(entry, str) else entry["image"]), None))
    else:
        for p in _visible(sorted((root / "imagesTr").glob("*.nii*"))):
            pairs.append((p, root / "labelsTr" / p.name))
        for p in _visible(sorted((root / "imagesTs").glob("*.nii*"))):
            pairs.append((p, None))
    out = []
    for img, lab in pairs:
        cid = re.sub(r"\.nii(\.gz)?$", "", img.name)
        out.append(CaseSpec(cid, img, lab, label_map if lab is not None else None, "msd"))
    return sorted(out, key=lambda c: c.case_id)


def _pairs(csv_path: Path, label_map: dict[int, int] | None) -> list[CaseSpec]:
    if csv_path.is_dir():
        raise ValueError(f"{csv_path}: the pairs layout takes a CSV file with image,label columns, not a folder")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise ValueError(f"{csv_path}: CSV needs a header with an 'image' column (and 'label')")
        rows = list(reader)
    out, seen = [], set()
    for i, row in enumerate(rows, start=2):
        if not (row.get("image") or "").strip():
            raise ValueError(f"{csv_path}: line {i} has no image")
        img = (csv_path.parent / row["image"].strip()).resolve()
        lab_text = (row.get("label") or "").strip()
        lab = (csv_path.parent / lab_text).resolve() if lab_text else None
        cid = re.sub(r"(\.nii(\.gz)?|\.nrrd|\.nhdr|\.mha)$", "", img.name) or f"case{i}"
        if cid in seen:
            cid = f"{cid}_{i}"
        seen.add(cid)
        out.append(CaseSpec(cid, img, lab, label_map if lab is not None else None, "pairs"))
    return out


def discover_cases(layout: str, input: str | Path, *, label_map: str | None = None, priors: str | Path | None = None) -> list[CaseSpec]:
    """All cases of ``input`` in dataset ``layout``, sorted by case id."""
    root = Path(input)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    if not root.exists():
        raise FileNotFoundError(f"{root}: input does not exist")
    parsed = parse_label_map(label_map) if label_map else None
    if parsed is not None and layout != "pairs":
        raise ValueError(f"--label-map applies to the pairs layout; {layout} has fixed labels")
    if layout == "abdomenct1k":
        cases = _abdomenct1k(root)
    elif layout == "totalsegmentator":
        cases = _totalsegmentator(root)
    elif layout == "msd":
        cases = _msd(root)
    else:
        cases = _pairs(root, parsed)
    if priors is not None:
        pdir = Path(priors)
        if not pdir.is_dir():
            raise FileNotFoundError(f"{pdir}: priors folder does not exist")
        for c in cases:
            if c.labels is None:
                for ext in (".nii.gz", ".nii"):
                    if (pdir / f"{c.case_id}{ext}").exists():
                        c.labels, c.label_map, c.labels_are_predictions = pdir / f"{c.case_id}{ext}", None, True
                        break
    if not cases:
        raise ValueError(f"{root}: no cases found for layout {layout!r}")
    return sorted(cases, key=lambda c: c.case_id)
