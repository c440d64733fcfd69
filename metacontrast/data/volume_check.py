"""Reading and checking one case's volumes before they enter a manifest (:mod:`metacontrast.data.manifest`).

A case (a patient's folder, or one MSD case) is the unit that is skipped when something is bad: each problem
raises :class:`~metacontrast.data.errors.InvalidVolumeError` naming the file or folder and the problem (see
the manifest module's "Validation").
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from metacontrast.data.dicom import is_dicom_series, load_volume
from metacontrast.data.errors import InvalidVolumeError

__all__ = ["Case", "VolumeCandidate", "VolumeInfo", "read_volume", "validate_case", "validate_pair"]


@dataclass(frozen=True)
class VolumeCandidate:
    """An image/label pair found in the dataset folder, not yet validated."""

    image: Path
    label: Path
    volume_id: str
    organ_state: str


@dataclass
class Case:
    """One patient's folder (or one MSD case): the unit that is skipped when something is bad.

    Attributes:
        name: the case's folder or file name, relative to ``dataset_dir`` (for the report).
        patient_id: the id written to the manifest (a pseudonym for DICOM).
        volumes: its image/label pairs.
        error: a problem found while discovering the case (e.g. no ``Info.cfg``).
    """

    name: str
    patient_id: str
    volumes: list[VolumeCandidate] = field(default_factory=list)
    error: InvalidVolumeError | None = None


@dataclass(frozen=True)
class VolumeInfo:
    """Geometry of a volume as MONAI loads it: shape and spacing in (x, y, z) order."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray


def _read_nifti(path: Path) -> tuple[np.ndarray, VolumeInfo]:
    """Read a whole NIfTI file (so that truncation shows) with its header geometry."""
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel/gzip/zlib raise EOFError, zlib.error, ImageFileError, ...
        raise InvalidVolumeError(
            path, f"cannot read NIfTI file, truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    spacing = tuple(float(z) for z in image.header.get_zooms()[: array.ndim])
    return array, VolumeInfo(shape=tuple(array.shape), spacing=spacing, affine=np.asarray(image.affine))


def _read_dicom(path: Path) -> tuple[np.ndarray, VolumeInfo]:
    """Read a DICOM series folder (geometry-checked) as MONAI loads it."""
    volume = load_volume(path, check_geometry=True)
    array = volume.numpy()
    spacing = tuple(float(s) for s in volume.pixdim)
    return array, VolumeInfo(shape=tuple(array.shape), spacing=spacing, affine=np.asarray(volume.affine))


def read_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, VolumeInfo]:
    """Read a NIfTI file or DICOM series folder fully and check that it is a 3D volume.

    Raises:
        InvalidVolumeError: the file is missing, unreadable, or not 3D.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidVolumeError(path, "file not found")
    array, info = (_read_dicom if is_dicom_series(path) else _read_nifti)(path)
    if array.ndim != 3:
        raise InvalidVolumeError(path, f"expected a 3D volume, got an array of shape {list(array.shape)}")
    return array, info


def _check_finite(path: Path, array: np.ndarray) -> None:
    """Refuse NaN and infinite values."""
    if np.issubdtype(array.dtype, np.floating):
        if np.isnan(array).any():
            raise InvalidVolumeError(path, f"volume contains NaN ({int(np.isnan(array).sum())} voxels)")
        if np.isinf(array).any():
            raise InvalidVolumeError(path, "volume contains infinite values")


def _check_image(path: Path, array: np.ndarray) -> None:
    """An image must be finite and not all zeros."""
    _check_finite(path, array)
    if not np.any(array):
        raise InvalidVolumeError(path, "image volume is all zeros")


def _check_label(path: Path, array: np.ndarray, labels: Mapping[str, str]) -> None:
    """A label must hold only the declared integer classes."""
    _check_finite(path, array)
    values = np.unique(array)
    if not np.array_equal(values, np.round(values)):
        raise InvalidVolumeError(path, "label volume holds non-integer values")
    declared = sorted(int(k) for k in labels)
    outside = [int(v) for v in values if int(v) not in declared]
    if outside:
        raise InvalidVolumeError(path, f"label values {outside} outside the declared classes {declared}")


def validate_pair(
    image_path: Path, image: VolumeInfo, label_path: Path, label: VolumeInfo, atol: float = 1e-3
) -> None:
    """Check that a label lies on its image's voxel grid.

    Raises:
        InvalidVolumeError: naming the label file, when shape, spacing or affine differ.
    """
    if image.shape != label.shape:
        raise InvalidVolumeError(
            label_path, f"label shape {list(label.shape)} differs from image shape {list(image.shape)} "
            f"({image_path.name})"
        )
    if not np.allclose(image.spacing, label.spacing, atol=atol, rtol=0):
        raise InvalidVolumeError(
            label_path, f"label spacing {_rounded(label.spacing)} differs from image spacing "
            f"{_rounded(image.spacing)} ({image_path.name})"
        )
    offset = float(np.abs(image.affine - label.affine).max())
    if offset > atol:
        raise InvalidVolumeError(
            label_path, f"label is not on the image's voxel grid: affines differ by up to {offset:.4g} "
            f"({image_path.name})"
        )


def _rounded(values: Iterable[float], decimals: int = 6) -> list[float]:
    """Floats rounded for a stable, readable JSON (float32 headers give 1.100000023841858)."""
    return [round(float(v), decimals) for v in values]


def _validate_volume(candidate: VolumeCandidate, labels: Mapping[str, str]) -> dict[str, Any]:
    """Read and check one image/label pair; return its geometry fields for the manifest."""
    image_array, image_info = read_volume(candidate.image)
    _check_image(candidate.image, image_array)
    label_array, label_info = read_volume(candidate.label)
    _check_label(candidate.label, label_array, labels)
    validate_pair(candidate.image, image_info, candidate.label, label_info)
    return {
        "num_slices": int(image_info.shape[2]),
        "shape": [int(s) for s in image_info.shape],
        "spacing": _rounded(image_info.spacing),
    }


def validate_case(case: Case, dataset_dir: Path, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Validate every volume of a case and return its manifest entries (raises on the first error)."""
    if case.error is not None:
        raise case.error
    entries = []
    for candidate in case.volumes:
        entry = {
            "image": relative(candidate.image, dataset_dir),
            "label": relative(candidate.label, dataset_dir),
            "volume_id": candidate.volume_id,
            "patient_id": case.patient_id,
            "organ_state": candidate.organ_state,
        }
        entry.update(_validate_volume(candidate, labels))
        entries.append(entry)
    return entries


def relative(path: Path, dataset_dir: Path) -> str:
    """``path`` relative to ``dataset_dir``, with forward slashes on every platform."""
    return Path(os.path.relpath(path, dataset_dir)).as_posix()
