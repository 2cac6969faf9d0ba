"""Mask sources for sampling: where the conditions come from.

Three kinds of source, detected from the folder:

* a prepared dataset (``manifest.json`` of ``lad prepare``): its training masks, the paper's setting;
* a folder of NIfTI / NRRD label files (``*.nii.gz``, ``*.nii``, ``*.nrrd``) holding Lad masks;
* a folder of ``.npy`` masks in the public release's format: ``(32, 256, 256)`` uint8, labels {0, 1, 2}.

Every item is a Lad mask ``(D, H, W)`` uint8 in {0, 1, 2} with a ``(4, 4)`` affine mapping
``(d, h, w)`` to RAS millimetres. Masks on another grid than the model's are resampled (nearest)
to it with a warning; labels outside {0, 1, 2} are rejected with the file named.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from lad.utils.log import get_logger

__all__ = ["MaskItem", "MaskSource", "open_mask_source", "files_fingerprint"]

log = get_logger(__name__)

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclasses.dataclass
class MaskItem:
    """One conditioning mask: ``mask`` (D, H, W) uint8 in {0, 1, 2}; ``affine`` (4, 4) (d, h, w) -> RAS mm."""

    id: str
    mask: np.ndarray
    affine: np.ndarray
    source: str


def _check_labels(mask: np.ndarray, where: str) -> np.ndarray:
    if not np.all(np.isfinite(mask)):
        raise ValueError(f"{where}: mask contains NaN or inf")
    values = np.unique(mask)
    bad = [v for v in values.tolist() if v not in (0, 1, 2)]
    if bad:
        raise ValueError(f"{where}: mask labels must be in {{0, 1, 2}} (0 background, 1 organ, 2 tumour); found {bad[:10]}")
    return mask.astype(np.uint8, copy=False)


def _resample_nearest(mask: np.ndarray, affine: np.ndarray, shape: Sequence[int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resampling of ``mask`` to ``shape`` over the same field of view."""
    if tuple(mask.shape) == tuple(shape):
        return mask, affine
    log.warning("%s: mask grid %s differs from the model's %s; resampled (nearest neighbour)", where, mask.shape, tuple(shape))
    factors = [s / t for s, t in zip(mask.shape, shape)]
    idx = [np.minimum(((np.arange(t) + 0.5) * f).astype(np.int64), s - 1) for t, f, s in zip(shape, factors, mask.shape)]
    out = mask[np.ix_(*idx)]
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * np.asarray(factors)[None, :]
    # voxel centre of new index 0 sits at old index (f - 1) / 2
    new_affine[:3, 3] = affine[:3, :3] @ ((np.asarray(factors) - 1) / 2) + affine[:3, 3]
    return out, new_affine


class MaskSource:
    """A list of conditioning masks, loaded lazily; ``len`` and ``[i]`` give ``MaskItem``s."""

    def __init__(self, path: str | Path, *, shape: Sequence[int] | None = None, spacing: Sequence[float] | None = None, split: str = "train"):
        self.path = Path(path)
        self.shape = tuple(shape) if shape is not None else None
        self.spacing = tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: mask source does not exist")
        self._dataset = None
        if (self.path / "manifest.json").exists():
            from lad.data.dataset import PreparedDataset

            self.kind = "prepared"
            self._dataset = PreparedDataset(self.path, split=split)
            self.ids = [w["id"] for w in self._dataset.windows]
        elif self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if not p.name.startswith("."))
            nifti = [p for p in files if p.name.endswith(_IMAGE_SUFFIXES)]
            npy = [p for p in files if p.suffix == ".npy"]
            if nifti and npy:
                raise ValueError(f"{self.path}: mixes NIfTI and .npy masks; use one kind per folder")
            if not nifti and not npy:
                raise ValueError(f"{self.path}: no masks found (expected a prepared dataset, NIfTI/NRRD files or .npy files)")
            self.kind = "nifti" if nifti else "npy"
            self.files = nifti or npy
            self.ids = [p.name.split(".")[0] for p in self.files]
        else:
            raise ValueError(f"{self.path}: not a folder of masks or a prepared dataset")
        if not self.ids:
            raise ValueError(f"{self.path}: the mask source is empty")

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """sha256 of every file the masks come from (relative path, size, modification time in ns).

        A mask added, removed, rewritten or truncated changes it; ``lad sample`` refuses to resume a
        folder whose records were made from another fingerprint.
        """

        if self.kind == "prepared":
            patients = sorted({w["patient"] for w in self._dataset.windows})
            files = [self.path / "manifest.json"] + [self.path / "patients" / p / "mask.npy" for p in patients]
        else:
            files = list(self.files)
        return files_fingerprint(self.path, files)

    def _npy_affine(self, shape: Sequence[int]) -> np.ndarray:
        # public-release arrays carry no geometry: use the model's spacing in the canonical orientation
        sx, sy, sz = self.spacing
        aff = np.zeros((4, 4))
        aff[0, 2], aff[1, 1], aff[2, 0], aff[3, 3] = -sx, -sy, sz, 1.0
        return aff

    def __getitem__(self, i: int) -> MaskItem:
        if self.kind == "prepared":
            item = self._dataset[i]
            mask, affine, where = item["mask"][0], np.asarray(item["affine"]), f"{self.path}:{self.ids[i]}"
        elif self.kind == "npy":
            f = self.files[i]
            where = str(f)
            try:
                mask = np.load(f, allow_pickle=False)
            except Exception as e:  # numpy raises several error types for corrupt files
                raise ValueError(f"{f}: unreadable .npy mask ({e})") from None
            if mask.ndim == 4 and mask.shape[0] == 1:
                mask = mask[0]
            if mask.ndim != 3:
                raise ValueError(f"{f}: mask must be (D, H, W), got shape {mask.shape}")
            affine = self._npy_affine(mask.shape)
        else:
            import SimpleITK as sitk

            from lad.data.io import affine_dhw_to_ras, canonicalize, read_image

            f = self.files[i]
            where = str(f)
            img = canonicalize(read_image(f))
            mask = sitk.GetArrayFromImage(img)
            affine = affine_dhw_to_ras(img)
        mask = _check_labels(np.asarray(mask), where)
        if self.shape is not None:
            mask, affine = _resample_nearest(mask, affine, self.shape, where)
        return MaskItem(id=self.ids[i], mask=np.ascontiguousarray(mask), affine=affine, source=where)


def open_mask_source(path: str | Path, **kwargs) -> MaskSource:
    """Open a mask source (prepared dataset, NIfTI folder or public-release .npy folder)."""
    return MaskSource(path, **kwargs)


def files_fingerprint(root: Path, files) -> str:
    """sha256 over each file's path (relative to ``root``), size and modification time ("missing" when gone)."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.stat()
            h.update(f"{f.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{f.relative_to(root)}\tmissing\n".encode())
    return h.hexdigest()
