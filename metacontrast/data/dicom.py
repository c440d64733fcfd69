"""DICOM series as 3D volumes: geometry checks and one loader for NIfTI files and DICOM folders.

A DICOM series is a folder of single-slice files (one series per folder). Reading goes through
MONAI's ``LoadImage`` with ``reader="ITKReader"`` (:data:`DICOM_READER`): ITK/GDCM sorts the files
by their position along the slice normal and builds the affine from ``ImagePositionPatient``,
``ImageOrientationPatient`` and ``PixelSpacing``, so the volume comes out as an array of shape
``(Columns, Rows, slices)`` in MONAI's usual (x, y, z) order with its RAS affine.  MONAI's
``PydicomReader`` gives the same array and affine on the PGBM series (checked to 1e-7); ITK is the
choice because it is also what a plain ``LoadImage()`` picks for a folder, so transforms that use
the default reader agree with this module, and because it handles both formats in one reader.

Why the geometry checks are hand-written: neither reader refuses a series with a missing slice
(ITK only prints a warning, and both give the volume a wrong, averaged slice spacing),
nor one whose slices disagree on ``PixelSpacing``.  :func:`check_series_geometry` reads the headers
only (no pixel data, milliseconds) and raises :class:`~metacontrast.data.errors.InvalidVolumeError`
naming the file or folder and the problem.  A slice missing at either end of a series cannot be
detected from geometry and is not.

For transforms: ``LoadImaged(keys, reader=reader_for(path))`` or simply ``load_volume(path)``;
``LoadImaged(keys=["image", "label"], reader="ITKReader")`` reads DICOM folders, and a plain
``LoadImaged(keys)`` (MONAI's reader auto-selection) reads both ``.nii.gz`` files (NibabelReader)
and DICOM folders (ITKReader) with the same result as :func:`load_volume`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom

from metacontrast.data.errors import InvalidVolumeError

if TYPE_CHECKING:
    from monai.data import MetaTensor
    from monai.transforms import LoadImage

__all__ = [
    "DICOM_READER",
    "NIFTI_READER",
    "SeriesGeometry",
    "check_series_geometry",
    "is_dicom_series",
    "list_series_files",
    "load_volume",
    "read_series_headers",
    "reader_for",
    "series_patient_identity",
]

DICOM_READER = "ITKReader"
"""MONAI reader name to pass to ``LoadImage``/``LoadImaged`` for a DICOM series folder."""

NIFTI_READER = "NibabelReader"
"""MONAI reader name for ``.nii``/``.nii.gz`` files (ITK warns about ACDC's sform scales)."""

_REQUIRED_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


@dataclass(frozen=True)
class SeriesGeometry:
    """Geometry of a checked DICOM series, with its files sorted along the slice normal.

    Attributes:
        folder: the series folder.
        files: slice files in order of increasing position along the normal.
        rows, columns: in-plane size of every slice.
        pixel_spacing: DICOM ``PixelSpacing`` (between rows, between columns), millimetres.
        slice_spacing: distance between neighbouring slice centres along the normal, millimetres.
        orientation: DICOM ``ImageOrientationPatient`` (row cosines, column cosines).
    """

    folder: Path
    files: tuple[Path, ...]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    orientation: tuple[float, ...]

    @property
    def num_slices(self) -> int:
        """Number of slices in the series."""
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape as MONAI loads it: (x = columns, y = rows, z = slices)."""
        return (self.columns, self.rows, self.num_slices)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in the order of :attr:`shape`, millimetres."""
        return (self.pixel_spacing[1], self.pixel_spacing[0], self.slice_spacing)


def is_dicom_series(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder, which this project always treats as one DICOM series."""
    return Path(path).is_dir()


def reader_for(path: str | os.PathLike[str]) -> str:
    """The MONAI reader name for ``path``: :data:`DICOM_READER` for a folder, else NIfTI."""
    return DICOM_READER if is_dicom_series(path) else NIFTI_READER


def list_series_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every visible regular file in a series folder, sorted by name.

    Raises:
        InvalidVolumeError: the folder does not exist or holds no files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidVolumeError(folder, "DICOM series folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InvalidVolumeError(folder, "DICOM series folder holds no files")
    return files


def read_series_headers(folder: str | os.PathLike[str]) -> list[tuple[Path, pydicom.Dataset]]:
    """Read the header (no pixel data) of every file in a series folder.

    Raises:
        InvalidVolumeError: a file is not readable as DICOM, or lacks a geometry tag.
    """
    headers = []
    for path in list_series_files(folder):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for corrupt input
            raise InvalidVolumeError(path, f"not a readable DICOM file ({exc})") from exc
        missing = [tag for tag in _REQUIRED_TAGS if tag not in header]
        if missing:
            raise InvalidVolumeError(path, f"DICOM slice lacks geometry tag(s) {', '.join(missing)}")
        headers.append((path, header))
    return headers


def series_patient_identity(folder: str | os.PathLike[str]) -> tuple[str, str]:
    """``(PatientID, PatientName)`` of the first file of a series, empty strings when absent.

    These are identifiers: callers must pseudonymise them before writing them anywhere.
    """
    path = list_series_files(folder)[0]
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "PatientName"])
    except Exception as exc:
        raise InvalidVolumeError(path, f"not a readable DICOM file ({exc})") from exc
    return str(header.get("PatientID", "") or ""), str(header.get("PatientName", "") or "")


def _require_uniform(
    headers: Sequence[tuple[Path, pydicom.Dataset]],
    tag: str,
    key: Callable[[pydicom.Dataset], Any],
    problem: str,
    show_values: bool = True,
) -> Any:
    """Return the value of ``key`` shared by all headers; raise on the first file that differs.

    The reference value is the most common one, so the error points at the odd slice out.
    ``show_values=False`` keeps the values (e.g. UIDs, which link to a patient) out of the message.
    """
    values = [key(header) for _, header in headers]
    reference, _ = Counter(values).most_common(1)[0]
    for (path, _header), value in zip(headers, values):
        if value == reference:
            continue
        if not show_values:
            raise InvalidVolumeError(path, f"{problem}: {tag} differs from the other slices'")
        raise InvalidVolumeError(
            path,
            f"{problem}: {tag} {_listed(value)} differs from {_listed(reference)} in the other slices "
            f"of the series",
        )
    return reference


def _listed(value: Any) -> Any:
    """Tuples print as lists, the way DICOM multi-values are usually written."""
    return list(value) if isinstance(value, tuple) else value


def _rounded(values: Sequence[Any], decimals: int = 4) -> tuple[float, ...]:
    """Header floats rounded so that re-encoded copies of one value compare equal."""
    return tuple(round(float(v), decimals) for v in values)


def _check_slice_positions(
    folder: Path, files: Sequence[Path], positions: np.ndarray, rtol: float
) -> float:
    """Check that sorted slice positions are evenly spaced; return the spacing.

    Raises:
        InvalidVolumeError: two slices share a position, a slice is missing (a gap of about a
            multiple of the usual spacing), or the spacing is otherwise uneven.
    """
    gaps = np.diff(positions)
    nominal = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        between = f"between {files[i].name} and {files[i + 1].name}"
        if gap <= rtol * max(nominal, 1e-6):
            raise InvalidVolumeError(folder, f"two slices at the same position ({between})")
        if abs(gap - nominal) <= rtol * nominal:
            continue
        ratio = gap / nominal
        if ratio > 1.5 and abs(ratio - round(ratio)) <= rtol * round(ratio):
            raise InvalidVolumeError(
                folder,
                f"missing slice: gap of {gap:.4g} mm {between} where the other slices are "
                f"{nominal:.4g} mm apart (about {round(ratio) - 1} slice(s) missing)",
            )
        raise InvalidVolumeError(
            folder,
            f"inconsistent slice spacing: {gap:.4g} mm {between}, {nominal:.4g} mm elsewhere",
        )
    return nominal


def check_series_geometry(folder: str | os.PathLike[str], rtol: float = 0.01) -> SeriesGeometry:
    """Check that a DICOM folder is one complete, regularly sampled series.

    Checks, from headers only: every file is DICOM with the geometry tags; one
    ``SeriesInstanceUID``; the same ``Rows``/``Columns``, ``PixelSpacing`` and
    ``ImageOrientationPatient`` in every slice (to 1e-4); slice positions along the normal
    (row cosines x column cosines) evenly spaced to ``rtol`` (relative), which finds missing and
    duplicated slices.

    Args:
        folder: the series folder.
        rtol: relative tolerance on the distance between neighbouring slices.

    Returns:
        The series geometry, files sorted along the slice normal.

    Raises:
        InvalidVolumeError: naming the folder or the offending file, and the problem.
    """
    folder = Path(folder)
    headers = read_series_headers(folder)
    _require_uniform(headers, "SeriesInstanceUID", lambda h: str(h.get("SeriesInstanceUID", "")),
                     "more than one series in the folder", show_values=False)
    rows, columns = _require_uniform(headers, "Rows/Columns", lambda h: (int(h.Rows), int(h.Columns)),
                                     "inconsistent slice size")
    pixel_spacing = _require_uniform(headers, "PixelSpacing", lambda h: _rounded(h.PixelSpacing),
                                     "inconsistent spacing")
    orientation = _require_uniform(headers, "ImageOrientationPatient",
                                   lambda h: _rounded(h.ImageOrientationPatient),
                                   "inconsistent orientation")
    cosines = np.asarray(headers[0][1].ImageOrientationPatient, dtype=float)  # unrounded
    normal = np.cross(cosines[:3], cosines[3:])
    positions = np.array([float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float)))
                          for _, h in headers])
    order = np.argsort(positions, kind="stable")
    files = tuple(headers[i][0] for i in order)
    if len(files) > 1:
        slice_spacing = _check_slice_positions(folder, files, positions[order], rtol)
    else:
        slice_spacing = float(headers[0][1].get("SliceThickness", 1.0) or 1.0)
    return SeriesGeometry(
        folder=folder,
        files=files,
        rows=rows,
        columns=columns,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        slice_spacing=slice_spacing,
        orientation=orientation,
    )


@lru_cache(maxsize=None)
def _loader(reader: str) -> LoadImage:
    """One MONAI ``LoadImage`` per reader name (constructing readers is not free).

    MONAI is imported here, not at module level, so that header checks and NIfTI-only manifest
    builds do not pay the ~10 s import of ``monai.transforms``.
    """
    from monai.transforms import LoadImage

    return LoadImage(reader=reader, image_only=True)


def load_volume(path: str | os.PathLike[str], check_geometry: bool = True) -> MetaTensor:
    """Load a ``.nii``/``.nii.gz`` file or a DICOM series folder as a 3D ``MetaTensor``.

    Args:
        path: a NIfTI file or a folder holding one DICOM series.
        check_geometry: for a DICOM folder, run :func:`check_series_geometry` first so that a
            series with a missing slice or inconsistent spacing is refused instead of being read
            with the wrong geometry.

    Returns:
        The volume, no channel dimension, shape (x, y, z), with ``affine`` and ``pixdim``.

    Raises:
        InvalidVolumeError: the DICOM geometry is broken or the file cannot be read.
    """
    path = Path(path)
    if check_geometry and is_dicom_series(path):
        check_series_geometry(path)
    try:
        return _loader(reader_for(path))(str(path))
    except Exception as exc:  # readers raise many types (EOFError, RuntimeError, OSError...)
        raise InvalidVolumeError(path, f"cannot be read as a volume ({type(exc).__name__}: {exc})") from exc
