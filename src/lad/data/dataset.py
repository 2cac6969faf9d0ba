"""``PreparedDataset``: the one contract every later stage reads (docs/contracts.md); ``open_dataset`` and
``describe_dataset``: what the trainers take, a prepared folder or any ``torch.utils.data.Dataset`` of windows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lad.data.labels import hu_to_unit

__all__ = ["PreparedDataset", "open_dataset", "DatasetInfo", "describe_dataset"]


class PreparedDataset(torch.utils.data.Dataset):
    """Windows of a prepared dataset folder (written by ``lad prepare``), memory-mapped.

    ``ds[i]`` is a dict:

    * ``image``: ``(1, D, H, W)`` float32 in [0, 1] (HU [-1000, 400] scaled);
    * ``mask``: ``(1, D, H, W)`` uint8 in {0, 1, 2} (background, organ of interest, tumour);
    * ``organs``: ``(1, D, H, W)`` uint8 (0 background, 1 liver, 2 kidney, 3 spleen, 4 pancreas, 5 tumour);
    * ``affine``: ``(4, 4)`` float64 mapping ``(d, h, w, 1)`` to RAS millimetres;
    * ``meta``: the window's manifest entry (id, patient, split, z_range, provenance).

    ``split``: "train", "test" or None (all windows). ``organ_labels=False`` leaves ``organs`` out of
    the items (the trainers that only need the Lad mask read less). Each patient's arrays are opened
    once, lazily, with ``np.load(mmap_mode="r")``; DataLoader workers open their own.
    Attributes: ``windows`` (manifest entries of this split), ``fingerprint``, ``config`` (the resolved
    prepare config), ``shape`` ``(D, H, W)``, ``manifest``.
    """

    def __init__(self, path: str | Path, split: str | None = "train", *, organ_labels: bool = True):
        self.path = Path(path)
        self.organ_labels = bool(organ_labels)
        manifest_path = self.path / "manifest.json"
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: prepared dataset folder does not exist")
        if not manifest_path.exists():
            raise ValueError(f"{self.path}: not a prepared dataset (no manifest.json; run `lad prepare` first)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest_path}: corrupt manifest ({e})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != "lad-prepared":
            raise ValueError(f"{manifest_path}: not a lad prepared-dataset manifest (format is not 'lad-prepared')")
        missing = [k for k in ("config", "windows", "splits") if k not in self.manifest]
        if missing:
            raise ValueError(f"{manifest_path}: incomplete manifest, missing {missing}")
        if split not in ("train", "test", None):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        self.split = split
        self.windows: list[dict[str, Any]] = [w for w in self.manifest["windows"] if split is None or w["split"] == split]
        fp = self.path / "fingerprint.json"
        self.fingerprint: dict[str, Any] = json.loads(fp.read_text()) if fp.exists() else {}
        self.config: dict[str, Any] = self.manifest["config"]
        self.shape: tuple[int, int, int] = (int(self.config["depth"]), *map(int, self.config["size"]))
        self._arrays: dict[str, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.windows)

    def index_of(self, window_id: str) -> int:
        for i, w in enumerate(self.windows):
            if w["id"] == window_id:
                return i
        raise KeyError(f"{self.path}: no window {window_id!r} (split {self.split})")

    def _patient(self, pid: str) -> dict[str, np.ndarray]:
        arrays = self._arrays.get(pid)
        if arrays is None:
            folder = self.path / "patients" / pid
            try:
                arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in ("image", "mask", "organs")}
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"{folder}: missing or corrupt window arrays ({e})") from None
            for k, a in arrays.items():
                if a.ndim != 4 or tuple(a.shape[1:]) != self.shape:
                    raise ValueError(f"{folder / (k + '.npy')}: windows of shape {tuple(a.shape[1:])}, but the dataset's "
                                     f"windows are {self.shape}: mixed shapes (prepare it again with one preset)")
            self._arrays[pid] = arrays
        return arrays

    def get_arrays(self, i: int, *, organs: bool = True) -> dict[str, Any]:
        """Raw arrays of window ``i``: ``hu`` int16 (D, H, W) HU, ``mask`` / ``organs`` uint8 (D, H, W)
        (``organs`` None when not asked for), ``affine`` (4, 4) float64, ``meta`` (manifest entry)."""
        if not -len(self) <= i < len(self):
            raise ValueError(f"{self.path}: window {i} out of range for {len(self)} windows")
        w = self.windows[i]
        a = self._patient(w["patient"])
        k = w["index"]
        n = int(a["image"].shape[0])
        if not isinstance(k, int) or not 0 <= k < n or any(int(a[x].shape[0]) != n for x in ("mask", "organs")):
            raise ValueError(f"{self.path / 'patients' / w['patient'] / 'image.npy'}: window {w['id']!r} has index {k!r}, but "
                             f"the patient's arrays hold {n} windows: manifest and arrays disagree (prepare it again)")
        return {"hu": np.array(a["image"][k]), "mask": np.array(a["mask"][k]),
                "organs": np.array(a["organs"][k]) if organs else None,
                "affine": np.asarray(w["affine"], dtype=np.float64), "meta": w}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        r = self.get_arrays(i, organs=self.organ_labels)
        item = {"image": hu_to_unit(r["hu"])[None], "mask": r["mask"][None]}
        if self.organ_labels:
            item["organs"] = r["organs"][None]
        item["affine"] = r["affine"]
        item["meta"] = dict(r["meta"])
        return item

    def __getstate__(self):  # DataLoader workers re-open their own memory maps
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


def open_dataset(data: str | Path | torch.utils.data.Dataset, split: str | None = "train", *,
                 organ_labels: bool = True) -> torch.utils.data.Dataset:
    """What a trainer trains on: a prepared dataset folder (``lad prepare``) opened as ``PreparedDataset(data, split)``,
    or a ``torch.utils.data.Dataset`` object returned as it is (its items as ``PreparedDataset``'s: ``image``
    ``(1, D, H, W)`` float32 in [0, 1], ``mask`` ``(1, D, H, W)`` uint8 in {0, 1, 2}, ``organs`` for the organ
    segmenters; ``split`` does not apply to it)."""
    if isinstance(data, torch.utils.data.Dataset):
        return data
    if not isinstance(data, (str, Path)):
        raise TypeError(f"data must be a prepared dataset folder or a torch.utils.data.Dataset, got {type(data).__name__}")
    return PreparedDataset(data, split=split, organ_labels=organ_labels)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a run records about the windows it was trained on.

    ``name``: the folder (a prepared dataset) or ``<ClassName>`` (a Dataset object), for messages; ``shape``
    ``(D, H, W)``; ``spacing`` ``(x, y, z)`` mm, None when a Dataset object has no ``spacing`` attribute;
    ``organ``: the organ of interest (mask label 1); ``fingerprint``: ``fingerprint.json`` (or the object's
    ``fingerprint`` attribute, else empty); ``path``: the prepared folder, None for a Dataset object."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    organ: str
    fingerprint: dict[str, Any]
    path: Path | None


def describe_dataset(ds: torch.utils.data.Dataset) -> DatasetInfo:
    """:class:`DatasetInfo` of ``ds``: from the manifest of a ``PreparedDataset``; from a Dataset object's attributes
    ``spacing``, ``organ`` (default "pancreas") and ``fingerprint`` (optional) and its first item's image shape."""
    if isinstance(ds, PreparedDataset):
        return DatasetInfo(str(ds.path), tuple(ds.shape), tuple(float(v) for v in ds.config["spacing"]),
                           ds.config.get("organ", "pancreas"), ds.fingerprint, ds.path)
    name = f"<{type(ds).__name__}>"
    if len(ds) == 0:
        raise ValueError(f"{name}: the dataset has no items")
    item = ds[0]
    if not isinstance(item, dict) or "image" not in item:
        raise ValueError(f"{name}: items must be dicts with an 'image' (1, D, H, W) float32 in [0, 1] and a 'mask' (1, D, H, W) "
                         f"uint8 in {{0, 1, 2}} (as PreparedDataset's); item 0 is {type(item).__name__}"
                         + (f" with keys {sorted(item)}" if isinstance(item, dict) else ""))
    image = np.asarray(item["image"])
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"{name}: item 0's image has shape {tuple(image.shape)}; expected (1, D, H, W)")
    spacing = getattr(ds, "spacing", None)
    return DatasetInfo(name, tuple(int(v) for v in image.shape[1:]), None if spacing is None else tuple(float(v) for v in spacing),
                       str(getattr(ds, "organ", "pancreas")), dict(getattr(ds, "fingerprint", None) or {}), None)
