"""``lad prepare``: the paper's preprocessing (section 4.1.2) as a reusable, resumable command.

Per patient: read with geometry -> canonical orientation -> resample to the target spacing (image
linear, labels nearest) -> crop/pad H, W to the target size around the body -> clip HU to
[-1000, 400] -> windows of depth D along z over the organ of interest (pancreas): one per case centred
on it (the paper's, ``windows: one``) or overlapping every ``stride`` slices (``windows: sliding``) ->
Lad mask (0 background, 1 organ, 2 tumour) beside the organ label map. The output folder layout is
documented in docs/contracts.md; ``lad.data.PreparedDataset`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lad.config import resolve_config, to_dict
from lad.data.labels import HU_MAX, HU_MIN, ORGAN_LABELS, ORGAN_NAMES, lad_mask_from_organs
from lad.utils.atomic import OutputExistsError, atomic_dir, write_json
from lad.utils.log import get_logger, progress

__all__ = ["PrepareConfig", "prepare_dataset", "load_prepare_config", "process_case", "window_starts", "export_window", "DropCase", "split_patients"]

log = get_logger(__name__)

FORMAT = "lad-prepared"
VERSION = 1
_ORGANS = ("liver", "kidney", "spleen", "pancreas")


@dataclasses.dataclass
class PrepareConfig:
    """Preprocessing settings (presets: paper-abdomenct1k, paper-totalsegmentator, demo, tiny)."""

    spacing: tuple[float, float, float] = (1.6, 1.6, 2.3)
    """Target voxel spacing (x, y, z) in mm."""
    size: tuple[int, int] = (256, 256)
    """In-plane size (H, W) after crop/pad around the body."""
    depth: int = 32
    """Window depth D (slices)."""
    windows: Literal["one", "sliding"] = "sliding"
    """"one": one window per case, centred on the organ of interest's z-extent (the paper's, section 4.1.2:
    as many windows as CTs; the paper presets). "sliding": overlapping windows every ``stride`` slices
    over the organ (ours: more windows from few cases; the demo and tiny presets)."""
    stride: int = 0
    """Window stride along z with ``windows: sliding``; 0 means depth // 2."""
    organ: str = "pancreas"
    """Organ of interest: windows follow it and it is label 1 of the Lad mask."""
    require: list[str] = dataclasses.field(default_factory=list)
    """Organs that must be present and not cut short by the volume's z-extent (else the volume is dropped)."""
    split: float = 0.8
    """Fraction of patients in the training split (by patient, never by window)."""
    seed: int = 0
    """Seed of the patient split (applied to the sorted list of all discovered patient ids)."""
    hu_clip: tuple[float, float] = (HU_MIN, HU_MAX)
    """HU range kept (paper: [-1000, 400]); must lie inside [-1000, 400], the range ``hu_to_unit`` maps to [0, 1]."""
    body_threshold_hu: float = -500.0
    """Voxels above this HU count as body when centring the in-plane crop."""

    def __post_init__(self):
        if self.organ not in _ORGANS:
            raise ValueError(f"organ must be one of {_ORGANS}, got {self.organ!r}")
        bad = [o for o in self.require if o not in _ORGANS]
        if bad:
            raise ValueError(f"require: unknown organ(s) {bad}; choose from {_ORGANS}")
        if self.depth < 1 or min(self.size) < 1 or min(self.spacing) <= 0:
            raise ValueError("depth, size and spacing must be positive")
        if not 0.0 < self.split <= 1.0:
            raise ValueError(f"split must be in (0, 1], got {self.split}")
        lo, hi = self.hu_clip
        if not HU_MIN <= lo < hi <= HU_MAX:
            raise ValueError(f"hu_clip must satisfy {HU_MIN} <= low < high <= {HU_MAX}, got {list(self.hu_clip)}")
        if self.stride < 0:
            raise ValueError(f"stride must be >= 0 (0 means depth // 2), got {self.stride}")

    @property
    def window_stride(self) -> int:
        return self.stride if self.stride > 0 else max(1, self.depth // 2)


class DropCase(Exception):
    """A case that is skipped with a reason (recorded in the manifest's ``dropped`` list)."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def window_starts(z0: int, z1: int, depth: int, stride: int, n_slices: int, mode: str = "sliding") -> list[int]:
    """Start slices of the windows over the organ's z-extent ``[z0, z1]`` (inclusive).

    ``mode="one"``: one window centred on the organ. ``"sliding"``: an organ shorter than a window gets
    one window centred on it; a longer one gets windows from its first slice every ``stride`` slices,
    the last ending at its last slice. Starts are clipped to the volume and de-duplicated.
    """
    if mode not in ("one", "sliding"):
        raise ValueError(f"windows must be 'one' or 'sliding', got {mode!r}")
    extent = z1 - z0 + 1
    if extent <= depth or mode == "one":
        starts = [(z0 + z1 + 1) // 2 - depth // 2]
    else:
        starts = list(range(z0, z1 - depth + 2, stride))
        if starts[-1] + depth - 1 < z1:
            starts.append(z1 - depth + 1)
    return sorted({int(min(max(s, 0), n_slices - depth)) for s in starts})


def _resample(img, spacing, interp, default):
    """Resample ``img`` to ``spacing`` (x, y, z) mm on a grid with the same origin and direction.

    The new grid covers the same physical extent (``round(size * old / new)`` voxels per axis), so
    the affine of the result (``affine_dhw_to_ras``) is exact: no voxel is shifted.
    """
    import SimpleITK as sitk

    old_sp = np.asarray(img.GetSpacing(), dtype=float)
    old_size = np.asarray(img.GetSize())
    new_sp = np.asarray(spacing, dtype=float)
    new_size = np.maximum(1, np.round(old_size * old_sp / new_sp).astype(int))
    return sitk.Resample(img, [int(s) for s in new_size], sitk.Transform(), interp, img.GetOrigin(), new_sp.tolist(),
                         img.GetDirection(), default, img.GetPixelID())


def _crop_pad_hw(arr: np.ndarray, start_h: int, start_w: int, size: tuple[int, int], fill) -> np.ndarray:
    d, h, w = arr.shape
    out = np.full((d, size[0], size[1]), fill, dtype=arr.dtype)
    sh0, sw0 = max(start_h, 0), max(start_w, 0)
    sh1, sw1 = min(start_h + size[0], h), min(start_w + size[1], w)
    if sh1 > sh0 and sw1 > sw0:
        out[:, sh0 - start_h : sh1 - start_h, sw0 - start_w : sw1 - start_w] = arr[:, sh0:sh1, sw0:sw1]
    return out


def _translate(affine: np.ndarray, d: int, h: int, w: int) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = [d, h, w]
    return affine @ t


def case_inputs(spec) -> dict[str, list[int] | None]:
    """Fingerprint of one case's input files: ``{path: [size in bytes, modification time in ns]}``
    (None for a missing file; a DICOM folder counts every file in it). Stored in the patient's
    ``meta.json`` (or its dropped record): a resumed ``lad prepare`` redoes a case whose inputs changed."""
    files = [Path(spec.image)]
    if isinstance(spec.labels, dict):
        files += [Path(p) for p in spec.labels.values()]
    elif spec.labels is not None:
        files.append(Path(spec.labels))
    out: dict[str, list[int] | None] = {}
    for f in files:
        for g in (sorted(x for x in f.rglob("*") if x.is_file()) if f.is_dir() else [f]):
            try:
                st = g.stat()
                out[str(g)] = [int(st.st_size), int(st.st_mtime_ns)]
            except FileNotFoundError:
                out[str(g)] = None
    return out


def process_case(spec, cfg: PrepareConfig, out_root: Path, split: str) -> dict[str, Any]:
    """Prepare one case into ``out_root/patients/<case_id>`` (atomically); returns its meta.

    Raises ``DropCase`` with the reason when the case cannot be used.
    """
    import SimpleITK as sitk

    from lad.data.io import CaseError, affine_dhw_to_ras, load_case

    inputs = case_inputs(spec)  # before reading: a file changed while it is read is redone next time
    try:
        case = load_case(spec)
    except CaseError as e:
        msg = str(e)
        file, _, reason = msg.partition(": ")
        raise DropCase(file, reason or msg) from None
    if case.organs is None:
        raise DropCase(str(spec.image), "unlabeled (no labels and no priors); run `lad priors predict` and pass --priors")
    image = _resample(case.image, cfg.spacing, sitk.sitkLinear, HU_MIN)
    organs = _resample(case.organs, cfg.spacing, sitk.sitkNearestNeighbor, 0)
    affine = affine_dhw_to_ras(image)
    hu = sitk.GetArrayFromImage(image)
    lab = sitk.GetArrayFromImage(organs).astype(np.uint8)
    label_file = str(spec.labels if not isinstance(spec.labels, dict) else Path(next(iter(spec.labels.values()))).parent)
    if hu.shape[0] < cfg.depth:
        raise DropCase(str(spec.image), f"volume has {hu.shape[0]} slices at {cfg.spacing[2]} mm, fewer than one window of {cfg.depth}")

    for organ in cfg.require:
        zs = np.flatnonzero((lab == ORGAN_LABELS[organ]).any(axis=(1, 2)))
        if zs.size == 0:
            raise DropCase(label_file, f"required organ {organ} missing")
        if zs[0] == 0 or zs[-1] == lab.shape[0] - 1:
            raise DropCase(str(spec.image), f"required organ {organ} cut short by the scan's z-extent")
    organ_id = ORGAN_LABELS[cfg.organ]
    organ_z = np.flatnonzero(((lab == organ_id) | (lab == ORGAN_LABELS["tumor"])).any(axis=(1, 2)))
    if organ_z.size == 0:
        raise DropCase(label_file, f"organ of interest {cfg.organ} not present")

    resampled_shape = [int(x) for x in hu.shape]
    # in-plane crop/pad centred on the body's bounding box
    body = (hu > cfg.body_threshold_hu).any(axis=0)
    if body.any():
        hs, ws = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
        ch, cw = (hs[0] + hs[-1] + 1) // 2, (ws[0] + ws[-1] + 1) // 2
    else:
        ch, cw = hu.shape[1] // 2, hu.shape[2] // 2
    sh, sw = ch - cfg.size[0] // 2, cw - cfg.size[1] // 2
    lo, hi = cfg.hu_clip
    hu = _crop_pad_hw(np.clip(np.rint(hu), lo, hi).astype(np.int16), sh, sw, cfg.size, np.int16(lo))
    lab = _crop_pad_hw(lab, sh, sw, cfg.size, np.uint8(0))
    affine = _translate(affine, 0, sh, sw)

    starts = window_starts(int(organ_z[0]), int(organ_z[-1]), cfg.depth, cfg.window_stride, hu.shape[0], cfg.windows)
    imgs, masks, orgs, windows = [], [], [], []
    for s in starts:
        o = lab[s : s + cfg.depth]
        m = lad_mask_from_organs(o, cfg.organ)
        if not m.any():
            continue
        imgs.append(hu[s : s + cfg.depth])
        masks.append(m)
        orgs.append(o)
        counts = np.bincount(o.ravel(), minlength=6)
        windows.append({
            "id": f"{spec.case_id}_w{len(windows):03d}",
            "patient": spec.case_id,
            "split": split,
            "index": len(windows),
            "z_range": [int(s), int(s + cfg.depth)],
            "affine": _translate(affine, s, 0, 0).tolist(),
            "spacing": list(cfg.spacing),
            "organ_voxels": {ORGAN_NAMES[k]: int(counts[k]) for k in range(1, 6)},
            "source_image": str(spec.image),
            "source_labels": label_file,
            "labels_are_predictions": bool(case.labels_are_predictions),
        })
    if not windows:
        raise DropCase(label_file, f"no window contains the {cfg.organ}")
    meta = {
        "patient": spec.case_id,
        "split": split,
        "source_spacing": list(case.source_spacing),
        "resampled_shape": resampled_shape,  # (D, H, W) after resampling, before the in-plane crop/pad
        "crop_start_hw": [int(sh), int(sw)],
        "windows": windows,
        "inputs": inputs,
    }
    final = out_root / "patients" / spec.case_id
    with atomic_dir(final) as tmp:
        np.save(tmp / "image.npy", np.stack(imgs))
        np.save(tmp / "mask.npy", np.stack(masks))
        np.save(tmp / "organs.npy", np.stack(orgs))
        write_json(tmp / "meta.json", meta)  # written last: its presence means "finished"
    return meta


def split_patients(ids: list[str], fraction: float, seed: int) -> dict[str, str]:
    """Seeded train/test split by patient: ``{patient id: "train" | "test"}``.

    Computed from the sorted ids and ``seed`` only, so re-running (or listing the cases in another
    order) gives the same split; ``round(fraction * n)`` patients train, at least one of each when
    ``n > 1`` and ``fraction < 1``.
    """
    ids = sorted(ids)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n = len(ids)
    n_train = n if fraction >= 1.0 or n < 2 else min(n - 1, max(1, int(round(fraction * n))))
    return {ids[i]: ("train" if rank < n_train else "test") for rank, i in enumerate(order)}


def _settings_differ(path: Path, settings: dict[str, Any]) -> str:
    """'' when ``path`` holds the same prepare settings, else a short description of what differs."""
    if not path.exists():
        return "it is not a prepared dataset: no prepare_settings.json"
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return f"{path.name} is unreadable"
    new = json.loads(json.dumps(settings))
    # a key the folder's settings predate (e.g. windows) had its default value then
    defaults = json.loads(json.dumps(to_dict(PrepareConfig())))
    flat_old = {**{k: v for k, v in old.items() if k != "config"}, **defaults, **old.get("config", {})}
    flat_new = {**{k: v for k, v in new.items() if k != "config"}, **new["config"]}
    keys = sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))
    return ", ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in keys)


def _worker(args):
    spec, cfg, out_root, split = args
    try:
        return spec.case_id, process_case(spec, cfg, out_root, split), None
    except DropCase as e:
        return spec.case_id, None, {"patient": spec.case_id, "file": e.file, "reason": e.reason, "inputs": case_inputs(spec)}
    except Exception as e:  # one broken case must not stop a 1000-patient run; it is reported, not cached
        log.debug("unexpected error on %s", spec.case_id, exc_info=True)
        return spec.case_id, None, {"patient": spec.case_id, "file": str(spec.image),
                                    "reason": f"unexpected error {type(e).__name__}: {e}", "retry": True}


def _init_worker() -> None:
    """One ITK thread per pool worker: ``workers`` processes already use the cores."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def prepare_dataset(
    layout: str,
    input: str | Path,
    output: str | Path,
    config: PrepareConfig,
    *,
    label_map: str | None = None,
    priors: str | Path | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Prepare every case of ``input`` (``layout``) into ``output`` with ``config``; returns a summary.

    Resumable: patients whose ``patients/<id>/meta.json`` exists are skipped, ``manifest.json`` and
    ``fingerprint.json`` are rebuilt from all finished patients. An existing ``output`` written with
    other settings raises ``OutputExistsError`` unless ``overwrite``. Cases that cannot be used are
    dropped with their reason (manifest ``dropped``); the run goes on. Summary keys: patients, kept,
    dropped, windows_train, windows_test, seconds.
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    from lad.data.fingerprint import compute_fingerprint
    from lad.data.layouts import discover_cases

    t0 = time.perf_counter()
    out = Path(output)
    cases = discover_cases(layout, input, label_map=label_map, priors=priors)
    settings = {"format": FORMAT, "version": VERSION, "layout": layout, "input": str(Path(input).resolve()),
                "label_map": label_map, "priors": str(priors) if priors else None, "config": to_dict(config)}
    settings_path = out / "prepare_settings.json"
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        differs = _settings_differ(settings_path, settings)
        if overwrite:
            shutil.rmtree(out)
        elif differs:
            raise OutputExistsError(
                f"{out}: output folder exists with other settings ({differs}); "
                "pass --overwrite to replace it, or choose another --output"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(settings_path, settings)
    for stale in (out / "patients").glob(".*.tmp"):  # a patient interrupted mid-write: never read, redone
        log.info("%s: removing the unfinished folder of an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    splits = split_patients([c.case_id for c in cases], config.split, config.seed)

    metas: dict[str, dict] = {}
    dropped: dict[str, dict] = {}
    todo = []
    changed = []
    for c in cases:
        meta_path = out / "patients" / c.case_id / "meta.json"
        drop_path = out / "dropped" / f"{c.case_id}.json"
        try:
            done = json.loads(meta_path.read_text()) if meta_path.exists() else (
                json.loads(drop_path.read_text()) if drop_path.exists() else None)
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: corrupt record of a finished patient; preparing it again", meta_path.parent)
            done = {"inputs": None}  # differs from any fingerprint: redone below
        if done is not None and "inputs" in done and done["inputs"] != case_inputs(c):
            changed.append(c.case_id)  # its files were replaced, edited or truncated since: prepared again
            shutil.rmtree(meta_path.parent, ignore_errors=True)
            drop_path.unlink(missing_ok=True)
            done = None
        if done is None:
            todo.append((c, config, out, splits[c.case_id]))
        elif meta_path.exists():
            metas[c.case_id] = done
        else:
            dropped[c.case_id] = done
    if changed:
        log.warning("%s: the input files of %d patient(s) changed since they were prepared; preparing them again: %s",
                    out, len(changed), ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""))
    current = {c.case_id for c in cases}
    gone = sorted({p.name for p in (out / "patients").glob("*") if p.is_dir() and not p.name.startswith(".")} - current)
    gone += sorted({p.stem for p in (out / "dropped").glob("*.json")} - current - set(gone))
    if gone:  # no longer in the input: their old results leave the folder (the manifest lists only current cases)
        log.warning("%s: %d patient(s) are no longer in the input; removing their results: %s", out, len(gone),
                    ", ".join(gone[:10]) + (" ..." if len(gone) > 10 else ""))
        for cid in gone:
            shutil.rmtree(out / "patients" / cid, ignore_errors=True)
            (out / "dropped" / f"{cid}.json").unlink(missing_ok=True)
    skipped = len(cases) - len(todo)
    if skipped:
        log.info("%s: %d patient(s) already done (finished or dropped), %d to do", out, skipped, len(todo))
    results = []
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
            for r in progress(pool.map(_worker, todo), total=len(todo), desc="prepare", unit="patient", disable=not progress_bar):
                results.append(r)
    else:
        for t in progress(todo, desc="prepare", unit="patient", disable=not progress_bar):
            results.append(_worker(t))
    for cid, meta, drop in results:
        if meta is not None:
            metas[cid] = meta
        else:
            if drop.pop("retry", False) is False:  # unexpected errors are retried on the next run
                write_json(out / "dropped" / f"{cid}.json", drop)
            dropped[cid] = drop
            log.warning("dropped %s: %s: %s", cid, drop["file"], drop["reason"])

    for cid, m in metas.items():  # the split comes from the current case list, not a finished patient's meta
        m["split"] = splits[cid]
        for w in m["windows"]:
            w["split"] = splits[cid]
    windows = [w for cid in sorted(metas) for w in metas[cid]["windows"]]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": to_dict(config),
        "layout": layout,
        "seed": config.seed,
        "splits": {s: sorted(cid for cid in metas if metas[cid]["split"] == s) for s in ("train", "test")},
        "windows": windows,
        "dropped": [dropped[k] for k in sorted(dropped)],
    }
    write_json(out / "manifest.json", manifest)
    write_json(out / "fingerprint.json", compute_fingerprint(out, manifest, metas))
    summary = {
        "patients": len(cases),
        "kept": len(metas),
        "dropped": len(dropped),
        "windows_train": sum(w["split"] == "train" for w in windows),
        "windows_test": sum(w["split"] == "test" for w in windows),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if dropped:
        log.warning("%d case(s) dropped; reasons are listed in %s (\"dropped\")", len(dropped), out / "manifest.json")
    return summary


def load_prepare_config(preset: str | None, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> PrepareConfig:
    """A preset (default paper-abdomenct1k) < explicit options (``overrides``: ``{key: value}``, None values skipped,
    e.g. ``lad prepare --depth 32``) < ``--set key=value`` (``sets``): ``lad.config.resolve_config``'s merge order."""
    options = {k: v for k, v in (overrides or {}).items() if v is not None}
    return resolve_config(PrepareConfig, "prepare", preset or "paper-abdomenct1k", layers=[("command-line options", options)],
                          overrides=sets)


def export_window(prepared: str | Path, window_id: str, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write one window's image (HU), Lad mask and organ map as NIfTI with its geometry.

    Existing output files are refused unless ``overwrite``; nothing is written when the window cannot be read.
    """
    from lad.data.dataset import PreparedDataset
    from lad.data.io import write_nifti

    ds = PreparedDataset(prepared, split=None)
    idx = ds.index_of(window_id)
    out_dir = Path(out_dir)
    paths = {k: out_dir / f"{window_id}_{k}.nii.gz" for k in ("image", "mask", "organs")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]}: exists; pass --overwrite to replace it or choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a folder")
    item = ds.get_arrays(idx)
    write_nifti(item["hu"], item["affine"], paths["image"])
    write_nifti(item["mask"], item["affine"], paths["mask"])
    write_nifti(item["organs"], item["affine"], paths["organs"])
    return paths
