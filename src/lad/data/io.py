"""Reading and writing CT with full geometry (NIfTI, NRRD, MHA, DICOM series).

Everything is read with SimpleITK and brought to one canonical orientation: ITK "LPS" with an
identity direction (``DICOMOrient(img, "LPS")``), so ``sitk.GetArrayFromImage`` gives ``(D, H, W)``
with ``D`` inferior -> superior, ``H`` anterior -> posterior, ``W`` patient right -> left.
``affine_dhw_to_ras`` maps ``(d, h, w)`` indices to RAS millimetres (the NIfTI / nibabel world).

Labels are aligned to their image in physical space: a label on another grid or orientation is
resampled into the image's grid with nearest neighbour, never compared as arrays.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from lad.utils.atomic import atomic_path
from lad.utils.log import get_logger

if TYPE_CHECKING:
    from lad.data.layouts import CaseSpec

__all__ = [
    "CaseError",
    "LoadedCase",
    "read_image",
    "canonicalize",
    "affine_dhw_to_ras",
    "image_from_array",
    "write_nifti",
    "write_image",
    "align_label",
    "load_case",
    "check_ct",
    "read_pair",
    "load_npy",
]

log = get_logger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class CaseError(ValueError):
    """A problem with one input case; the message starts with the offending path."""


def _check_complete(path: Path) -> None:
    """Refuse a truncated or corrupt file before ITK reads it: ITK fills a cut-off integer volume with zeros.

    ``.gz`` files are decompressed completely (the gzip stream's end marker, CRC and length are checked);
    for NIfTI the (decompressed) byte count must hold the header's voxel data. Streams in 1 MiB chunks.
    """
    import gzip
    import zlib

    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz", ".gz")):
        return
    head, size = b"", 0
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    if len(head) < 544:
                        head += chunk[: 544 - len(head)]
                    size += len(chunk)
        else:
            with open(path, "rb") as f:
                head = f.read(544)
            size = path.stat().st_size
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CaseError(f"{path}: unreadable or corrupt image (truncated or corrupt compressed file: {e})") from None
    if not name.endswith((".nii", ".nii.gz")):
        return
    need = _nifti_bytes(head)
    if need is not None and size < need:
        raise CaseError(f"{path}: truncated file: {size} bytes of NIfTI data, the header needs {need}")


def _nifti_bytes(head: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file needs (voxel offset + voxel data) from its header, or None if not NIfTI."""
    import struct

    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:  # NIfTI-1
            dim = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:  # NIfTI-2
            dim = struct.unpack(order + "8q", head[16:80])
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            offset = int(struct.unpack(order + "q", head[168:176])[0])
            break
    else:
        return None
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dim[1 : ndim + 1]], dtype=np.int64))
    return max(offset, 348) + voxels * bitpix // 8


def read_image(path: str | Path) -> sitk.Image:
    """Read a NIfTI / NRRD / MHA file or a DICOM series folder with its geometry.

    Raises ``CaseError`` for a missing, unreadable, truncated or corrupt file (a ``.gz`` file is
    decompressed completely and its size checked against the NIfTI header first), a folder holding
    several DICOM series or none, and for NaN / inf voxels.
    """
    path = Path(path)
    if not path.exists():
        raise CaseError(f"{path}: file not found")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise CaseError(f"{path}: folder holds no DICOM series")
            if len(series) > 1:
                raise CaseError(f"{path}: folder holds {len(series)} DICOM series ({', '.join(series)}); give one series per folder")
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            reader.SetFileNames(files)
            img = reader.Execute()
        else:
            _check_complete(path)
            img = sitk.ReadImage(str(path))
    except CaseError:
        raise
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise CaseError(f"{path}: unreadable or corrupt image ({reason})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{path}: expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
    if img.GetDimension() != 3:
        raise CaseError(f"{path}: expected a 3D volume, got {img.GetDimension()}D")
    if img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        if path.name.endswith((".nii", ".nii.gz")):
            # ITK's NIfTI reader silently turns NaN into 0: look at the stored values with nibabel
            import nibabel as nib

            arr = np.asarray(nib.load(str(path)).dataobj)
        else:
            arr = sitk.GetArrayViewFromImage(img)
        if not np.all(np.isfinite(arr)):
            raise CaseError(f"{path}: image contains NaN or inf voxels")
    return img


def check_ct(img: sitk.Image, path: str | Path) -> None:
    """Refuse a CT that cannot be a patient: every voxel at or below -1000 HU (air only, e.g. an export of an
    empty or never-reconstructed series)."""
    hi = float(np.max(sitk.GetArrayViewFromImage(img)))
    if hi <= -1000.0:
        raise CaseError(f"{path}: every voxel is {hi:g} HU or below (air only): not a patient CT")


def load_npy(path: str | Path) -> np.ndarray:
    """``np.load`` of an array file, refusing a missing, truncated or corrupt one with its name (``CaseError``)."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CaseError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as e:  # numpy's errors for a cut-off or foreign file
        raise CaseError(f"{path}: unreadable, truncated or corrupt .npy file ({e})") from None


def read_pair(image_path: str | Path, label_path: str | Path) -> tuple[sitk.Image, sitk.Image]:
    """An image and its label map, both canonical, the label aligned to the image by geometry
    (``align_label``): a label whose header differs (mirrored, permuted, another grid) is resampled into
    the image's frame, one covering other space is refused. Never paired by array shape alone."""
    image = canonicalize(read_image(image_path))
    label = canonicalize(read_image(label_path), is_label=True)
    return image, align_label(label, image, label_path=Path(label_path), image_path=Path(image_path))


def canonicalize(img: sitk.Image, *, is_label: bool = False) -> sitk.Image:
    """Reorient to the canonical orientation (ITK "LPS", identity direction); array becomes (D, H, W).

    Axis flips / permutations are exact (``DICOMOrient``, no interpolation). An oblique volume is
    resampled onto the enclosing axis-aligned grid at its own spacing: linear with -1000 HU outside
    for images, nearest neighbour with 0 outside when ``is_label`` (or the pixel type is 8-bit).
    """
    out = sitk.DICOMOrient(img, "LPS")
    direction = np.asarray(out.GetDirection()).reshape(3, 3)
    if not np.allclose(direction, np.eye(3), atol=1e-4):
        # oblique acquisitions: DICOMOrient picks the closest axes; resample onto an axis-aligned grid
        out = _resample_axis_aligned(out, is_label=is_label)
    return out


def _resample_axis_aligned(img: sitk.Image, *, is_label: bool) -> sitk.Image:
    size = np.asarray(img.GetSize())
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)], float)
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    spacing = np.asarray(img.GetSpacing())
    lo, hi = pts.min(0), pts.max(0)
    new_size = np.maximum(1, np.round((hi - lo) / spacing).astype(int) + 1)
    nearest = is_label or img.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8)
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(img, [int(s) for s in new_size], sitk.Transform(), interp, lo.tolist(), spacing.tolist(),
                         np.eye(3).ravel().tolist(), -1000.0 if interp == sitk.sitkLinear else 0.0, img.GetPixelID())


def affine_dhw_to_ras(img: sitk.Image) -> np.ndarray:
    """(4, 4) float64 affine mapping array indices ``(d, h, w, 1)`` of ``img`` to RAS mm."""
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    m_xyz = direction * spacing[None, :]  # LPS mm per (x, y, z) index
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ m_xyz[:, ::-1]  # columns reordered to (d, h, w) = (z, y, x)
    affine[:3, 3] = _LPS_TO_RAS @ origin
    return affine


def image_from_array(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """Inverse of ``GetArrayFromImage`` + ``affine_dhw_to_ras``: a SimpleITK image with that geometry."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim != 3:
        raise ValueError(f"expected a (D, H, W) array, got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    m_xyz = (_LPS_TO_RAS @ affine[:3, :3])[:, ::-1]
    spacing = np.linalg.norm(m_xyz, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"degenerate affine (zero spacing): {affine.tolist()}")
    direction = m_xyz / spacing[None, :]
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin((_LPS_TO_RAS @ affine[:3, 3]).tolist())
    return img


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a (D, H, W) array with its (d, h, w) -> RAS affine as NIfTI, atomically."""
    return write_image(image_from_array(array, affine), path)


def write_image(img: sitk.Image, path: str | Path) -> Path:
    """Write a SimpleITK image as NIfTI (``.nii`` / ``.nii.gz``), atomically, and read the bytes back.

    ITK's NIfTI writer only prints ``** ERROR: NWAD: wrote only 0 of N bytes`` when the disk is full
    and returns normally, leaving a cut-off file: the temporary file is therefore checked like an input
    (``_check_complete``) before it is renamed. A failed write raises ``OSError`` naming ``path``.
    """
    import errno
    import shutil

    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=suffix == ".nii.gz")
            _check_complete(tmp)
        except (RuntimeError, CaseError) as e:
            try:
                full = shutil.disk_usage(path.parent).free < (1 << 20)
            except OSError:
                full = False
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else "write failed"
            raise OSError(errno.EIO, f"could not write the image ({reason})", str(path)) from None
    return path


def _physical_bounds(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box (LPS mm) of the voxel grid's outer faces."""
    size = np.asarray(img.GetSize(), float)
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5) for k in (-0.5, size[2] - 0.5)])
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    return pts.min(0), pts.max(0)


def _integer_label(label: sitk.Image, label_path: Path) -> sitk.Image:
    """Float label files (common) must hold whole numbers; they become Int32. Integer types are kept."""
    if label.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return label
    arr = sitk.GetArrayViewFromImage(label)
    frac = np.unique(arr[arr != np.round(arr)])
    if frac.size:
        raise CaseError(f"{label_path}: label map holds non-integer values {frac[:5].tolist()} (is this an image, not a label?)")
    return sitk.Cast(label, sitk.sitkInt32)


def align_label(label: sitk.Image, image: sitk.Image, *, label_path: Path, image_path: Path) -> sitk.Image:
    """Bring ``label`` onto ``image``'s grid (nearest neighbour) after checking they cover the same space.

    ``label`` may have any grid and orientation; the result has exactly ``image``'s size, spacing,
    origin and direction and keeps the label's integer pixel type (float labels -> Int32, values are
    never wrapped by a cast), 0 outside the label's grid. Raises ``CaseError`` naming ``label_path``
    when the physical extents differ by more than max(1 voxel, 1 mm) on a side.
    """
    label = _integer_label(label, label_path)
    same_grid = (
        label.GetSize() == image.GetSize()
        and np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-4)
        and np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
        and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-4)
    )
    if same_grid:
        out = sitk.Image(label)
        out.CopyInformation(image)  # remove sub-tolerance differences: exactly the image grid
        return out
    lo_i, hi_i = _physical_bounds(image)
    lo_l, hi_l = _physical_bounds(label)
    tol = np.maximum(np.maximum(image.GetSpacing(), label.GetSpacing()), 1.0)
    if np.any(np.abs(lo_i - lo_l) > tol) or np.any(np.abs(hi_i - hi_l) > tol):
        raise CaseError(
            f"{label_path}: label covers a different physical extent than {image_path} "
            f"(label {np.round(lo_l, 1).tolist()}..{np.round(hi_l, 1).tolist()} mm, "
            f"image {np.round(lo_i, 1).tolist()}..{np.round(hi_i, 1).tolist()} mm, LPS)"
        )
    log.debug("%s: resampling label onto the image grid of %s", label_path, image_path)
    return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, label.GetPixelID())


@dataclasses.dataclass
class LoadedCase:
    """One case in the canonical orientation: ``image`` float32 HU; ``organs`` uint8 {0..5} on the same grid."""

    spec: "CaseSpec"
    image: sitk.Image
    organs: sitk.Image | None
    source_spacing: tuple[float, float, float]
    labels_are_predictions: bool = False


def _map_labels(arr: np.ndarray, label_map: dict[int, int] | None, path: Path, allowed: set[int]) -> np.ndarray:
    values = set(np.unique(arr).tolist())
    if label_map is None:
        bad = sorted(values - allowed)
        if bad:
            raise CaseError(f"{path}: unexpected label values {bad[:10]} (expected {sorted(allowed)})")
        return arr.astype(np.uint8)
    if np.any(arr < 0):
        raise CaseError(f"{path}: negative label values {sorted(v for v in values if v < 0)[:10]}")
    lut_out = np.zeros(arr.shape, np.uint8)
    unmapped = sorted(v for v in values if v != 0 and v not in label_map)
    if unmapped:
        log.info("%s: label values %s are not in the label map and become background", path, unmapped[:10])
    for src, dst in label_map.items():
        lut_out[arr == src] = dst
    return lut_out


def load_case(spec: "CaseSpec") -> LoadedCase:
    """Read one case (image + labels) into the canonical orientation, labels on the image grid.

    Labels may be a single label-map file (values mapped by ``spec.label_map``) or a dict
    ``{organ_label_name: binary file}`` (TotalSegmentator); both become the organ label map
    (0 background, 1 liver, 2 kidney, 3 spleen, 4 pancreas, 5 tumour).
    """
    from lad.data.labels import ORGAN_LABELS

    raw = read_image(spec.image)
    check_ct(raw, spec.image)
    image = sitk.Cast(canonicalize(raw), sitk.sitkFloat32)
    # acquisition spacing along the canonical (x, y, z) axes (a permuted file's spacing is reordered)
    axis_of = np.abs(np.asarray(raw.GetDirection()).reshape(3, 3)).argmax(axis=0)  # file axis -> physical axis
    spacing = raw.GetSpacing()
    if sorted(axis_of) == [0, 1, 2]:
        spacing = [spacing[int(np.flatnonzero(axis_of == j)[0])] for j in range(3)]
    source_spacing = tuple(float(s) for s in spacing)
    organs = None
    if spec.labels is not None:
        if isinstance(spec.labels, dict):
            arr = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
            for name, f in spec.labels.items():
                lab = align_label(canonicalize(read_image(f), is_label=True), image, label_path=Path(f), image_path=Path(spec.image))
                a = sitk.GetArrayViewFromImage(lab)
                values = set(np.unique(a).tolist())
                if not values <= {0, 1}:
                    raise CaseError(f"{f}: expected a binary mask (0/1), found values {sorted(values)[:10]}")
                arr[a > 0] = ORGAN_LABELS[name.split("#")[0]]
        else:
            path = Path(spec.labels)
            lab = align_label(canonicalize(read_image(path), is_label=True), image, label_path=path, image_path=Path(spec.image))
            arr = _map_labels(sitk.GetArrayFromImage(lab), spec.label_map, path, set(range(6)))
        if not arr.any():
            where = spec.labels if not isinstance(spec.labels, dict) else Path(next(iter(spec.labels.values()))).parent
            raise CaseError(f"{where}: empty label map (no organ voxels)")
        organs = sitk.GetImageFromArray(arr)
        organs.CopyInformation(image)
    return LoadedCase(spec=spec, image=image, organs=organs, source_spacing=source_spacing,
                      labels_are_predictions=spec.labels_are_predictions)
