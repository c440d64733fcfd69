"""Manifest builders: a raw dataset folder -> ``data_manifests/<name>.json``, a MONAI datalist.

The manifest format is the contract in ``docs/architecture.md``: top-level ``name``, ``layout``,
``labels``, ``meta_labels``, ``preprocessing`` and the four splits ``pretrain``, ``train``, ``val``,
``test``, each a list of one entry per 3D volume (``image``, ``label``, ``volume_id``,
``patient_id``, ``organ_state``, ``num_slices``, ``spacing``, ``shape``; paths relative to
``dataset_dir``, a DICOM series being a folder path).  ``shape`` and ``spacing`` are in the array
order MONAI loads (x, y, z); slices are taken along the last axis.

Layouts
    ``acdc``   ``patientNNN/`` folders; ``Info.cfg`` gives the ED and ES frame numbers, so each
               patient gives two volumes ``patientNNN_frameXX.nii.gz`` (+ ``_gt``) with
               ``organ_state`` ``"ED"`` / ``"ES"``.
    ``msd``    Medical Segmentation Decathlon ``imagesTr/`` + ``labelsTr/`` (same file names); one
               case = one patient; ``organ_state`` ``"none"``.  Labels come from ``dataset.json``
               when the folder has one, else the hippocampus (Task04) labels.
    ``dicom``  ``<patient>/<image series>/`` + ``<patient>/<mask series>/`` DICOM folders
               (default ``FLAIRreg`` / ``MaskTumor``, labels 0 background, 1 tumour).

Splits
    Fixed by patient, so no patient is in two splits.  Patients are ordered by
    ``sha256(f"{seed}:{patient_id}")`` (a seeded permutation that does not depend on any library's
    random stream, with ``seed`` = :data:`SPLIT_SEED` = 0 unless given), then the first ``test``
    patients go to ``test``, the next ``train`` to ``train``, the next ``val`` to ``val`` and the
    rest (or ``pretrain`` of them when given) to ``pretrain``.  ``val`` comes after ``test`` and
    ``train``, so changing its size never moves a test or train patient (only pretrain ones).  Splits are assigned over every
    patient found, *before* validation, so a case that is skipped leaves a gap in its split
    instead of reshuffling everyone else; fixing the case later puts it back where it was.

Validation (before a volume enters a manifest)
    Each problem raises :class:`InvalidVolumeError` naming the file or folder and the problem:
    unreadable or truncated NIfTI; image and label of different shape, spacing or voxel grid; an
    ACDC folder without ``Info.cfg`` or whose ED/ES frame number matches no file; a DICOM series
    with a missing slice or inconsistent spacing (:mod:`metacontrast.data.dicom`); an image that is
    all zeros or holds NaN/inf; a label with NaN, non-integer values or values outside the
    declared classes.  With ``skip_bad=True`` (the default) the whole case (patient) is skipped,
    a warning is logged and the case is listed, with the file and the problem, in the report
    ``<name>.report.json`` beside the manifest; with ``skip_bad=False`` the first error is raised.

DICOM pseudonymisation
    The DICOM ``PatientID`` (else the patient folder name) is replaced by
    ``anon_`` + the first 16 hex digits of HMAC-SHA256(salt, PatientID) in ``patient_id`` and
    ``volume_id``; patients are grouped (and split) by it, so two folders of one patient stay in one
    split.  The salt is the ``salt`` argument, else the environment variable
    ``METACONTRAST_PSEUDONYM_SALT``, else the dataset name, which anyone can recompute: a warning
    says so and asks for a private salt.  ``image``/``label`` paths must stay usable, so they keep
    the folder names.  When a patient folder is named with its own PatientID or PatientName (as in
    TCIA's PGBM, whose folder ``PGBM-001`` holds PatientID ``PGBM-001``), the identifier therefore
    shows in the paths: the builder says so in the report (naming the patient by pseudonym only)
    and asks the user to rename the folders; it never renames anything in ``dataset_dir``.  No
    other header value (name, dates, UIDs) reaches the manifest or the report.

Writes
    JSON with sorted keys, indent 2 and a trailing newline, so a rerun is byte-identical.  Both
    files are written atomically (temporary file in the same folder, then ``os.replace``): a build
    that fails, or a write that fails, leaves the previous manifest as it was.  A stale report from
    an earlier run is removed when a rerun has nothing to report.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from metacontrast.data.dicom import is_dicom_series, load_volume, series_patient_identity
from metacontrast.data.errors import InvalidVolumeError
from metacontrast.io import atomic_write_text

__all__ = [
    "ACDC_LABELS",
    "DEFAULT_COUNTS",
    "DEFAULT_PREPROCESSING",
    "HIPPOCAMPUS_LABELS",
    "LAYOUTS",
    "SALT_ENV",
    "SPLITS",
    "SPLIT_SEED",
    "TUMOUR_LABELS",
    "BuildResult",
    "InvalidVolumeError",
    "SplitCounts",
    "VolumeInfo",
    "assign_splits",
    "atomic_write_text",
    "build_acdc_manifest",
    "build_dicom_manifest",
    "build_manifest",
    "build_msd_manifest",
    "make_manifest",
    "manifest_to_json",
    "parse_info_cfg",
    "pseudonymise",
    "read_volume",
    "report_path",
    "validate_pair",
    "write_manifest",
]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("pretrain", "train", "val", "test")
SPLIT_SEED = 0
"""Seed of the patient permutation behind every committed manifest's splits."""

SALT_ENV = "METACONTRAST_PSEUDONYM_SALT"

ACDC_LABELS: dict[str, str] = {"0": "background", "1": "RV", "2": "Myo", "3": "LV"}
HIPPOCAMPUS_LABELS: dict[str, str] = {"0": "background", "1": "anterior", "2": "posterior"}
TUMOUR_LABELS: dict[str, str] = {"0": "background", "1": "tumour"}

LAYOUTS: tuple[str, ...] = ("acdc", "msd", "dicom")

META_LABELS: dict[str, list[str]] = {
    "acdc": ["patient_id", "slice_quantile", "organ_state"],
    "msd": ["patient_id", "slice_quantile"],
    "dicom": ["patient_id", "slice_quantile"],
}

DEFAULT_PREPROCESSING: dict[str, dict[str, list[float] | list[int]]] = {
    # ACDC: the papers' 1.367 mm and 192 x 192.
    "acdc": {"pixel_size": [1.367, 1.367], "spatial_size": [192, 192]},
    # MSD hippocampus: native 1 mm; the volumes are at most ~50 x 60 voxels in-plane.
    "msd": {"pixel_size": [1.0, 1.0], "spatial_size": [64, 64]},
    # PGBM FLAIR: native 0.6875 mm; 320 x 320 keeps the whole 260 x 320 (or 280 x 320) field of
    # view, where 256 would cut 22 mm off each side of the longer axis.
    "dicom": {"pixel_size": [0.6875, 0.6875], "spatial_size": [320, 320]},
}


@dataclass(frozen=True)
class SplitCounts:
    """Number of patients per split; ``pretrain=None`` means every patient left over."""

    test: int
    val: int
    train: int
    pretrain: int | None = None


DEFAULT_COUNTS: dict[str, SplitCounts] = {
    # val: enough volumes for best-by-validation selection to mean something (ACDC 5 patients = 10
    # volumes, ED and ES; hippocampus 10 cases), held out of pre-training like test and train.
    "acdc": SplitCounts(test=20, val=5, train=20),
    "msd": SplitCounts(test=40, val=10, train=40),
    "dicom": SplitCounts(test=1, val=0, train=1),
}


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


@dataclass
class BuildResult:
    """What a builder returns: the manifest and what the report says.

    Attributes:
        manifest: the manifest dictionary (see the module docstring).
        skipped: one record per skipped case: ``case``, ``patient_id``, ``split``, ``file``
            (relative to ``dataset_dir``) and ``problem``.
        warnings: other things a user should act on (weak salt, identifying folder names).
    """

    manifest: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any] | None:
        """The report to write beside the manifest, or ``None`` when there is nothing to say."""
        if not self.skipped and not self.warnings:
            return None
        return {
            "name": self.manifest["name"],
            "layout": self.manifest["layout"],
            "skipped": self.skipped,
            "warnings": self.warnings,
        }

    def num_volumes(self) -> int:
        """Volumes in the manifest, all splits together."""
        return sum(len(self.manifest[split]) for split in SPLITS)


# --------------------------------------------------------------------------- reading + validation


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


def _validate_case(case: Case, dataset_dir: Path, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Validate every volume of a case and return its manifest entries (raises on the first error)."""
    if case.error is not None:
        raise case.error
    entries = []
    for candidate in case.volumes:
        entry = {
            "image": _relative(candidate.image, dataset_dir),
            "label": _relative(candidate.label, dataset_dir),
            "volume_id": candidate.volume_id,
            "patient_id": case.patient_id,
            "organ_state": candidate.organ_state,
        }
        entry.update(_validate_volume(candidate, labels))
        entries.append(entry)
    return entries


def _relative(path: Path, dataset_dir: Path) -> str:
    """``path`` relative to ``dataset_dir``, with forward slashes on every platform."""
    return Path(os.path.relpath(path, dataset_dir)).as_posix()


# --------------------------------------------------------------------------------------- splits


def assign_splits(
    patient_ids: Iterable[str], counts: SplitCounts, seed: int = SPLIT_SEED
) -> dict[str, str]:
    """Assign each patient to one split (see the module docstring for the rule).

    Returns:
        ``{patient_id: split}``; patients beyond an explicit ``pretrain`` count are left out.

    Raises:
        ValueError: the counts ask for more patients than there are.
    """
    unique = sorted(set(patient_ids))
    ordered = sorted(unique, key=lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest())
    fixed = counts.test + counts.val + counts.train
    pretrain = len(unique) - fixed if counts.pretrain is None else counts.pretrain
    if min(counts.test, counts.val, counts.train, pretrain) < 0 or fixed + pretrain > len(unique):
        raise ValueError(
            f"split counts {counts} ask for more patients than the {len(unique)} found (or are negative)"
        )
    sizes = (("test", counts.test), ("train", counts.train), ("val", counts.val), ("pretrain", pretrain))
    assignment, start = {}, 0
    for split, size in sizes:
        assignment.update({pid: split for pid in ordered[start : start + size]})
        start += size
    return assignment


# ------------------------------------------------------------------------------------ discovery


def parse_info_cfg(path: Path) -> dict[str, str]:
    """Parse an ACDC ``Info.cfg`` (``key: value`` lines).

    Raises:
        InvalidVolumeError: the file is missing or unreadable.
    """
    if not path.is_file():
        raise InvalidVolumeError(path, "Info.cfg not found (it gives the ED/ES frame numbers)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidVolumeError(path, f"cannot read Info.cfg ({exc})") from exc
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _acdc_volumes(folder: Path) -> list[VolumeCandidate]:
    """The ED and ES volumes of one ACDC patient folder, from its ``Info.cfg``."""
    info_path = folder / "Info.cfg"
    info = parse_info_cfg(info_path)
    volumes = []
    for state in ("ED", "ES"):
        value = info.get(state, "")
        if not value.isdigit():
            raise InvalidVolumeError(info_path, f"{state} frame number missing or not an integer: {value!r}")
        image = folder / f"{folder.name}_frame{int(value):02d}.nii.gz"
        if not image.is_file():
            raise InvalidVolumeError(info_path, f"{state} frame {int(value)} matches no file (no {image.name})")
        label = image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz"))
        volumes.append(VolumeCandidate(image, label, f"{folder.name}_{state}", state))
    return volumes


def _discover_acdc(dataset_dir: Path) -> list[Case]:
    """One case per ``patientNNN/`` folder."""
    folders = sorted(p for p in dataset_dir.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name))
    if not folders:
        raise InvalidVolumeError(dataset_dir, "no ACDC patient folders (patientNNN/) found")
    cases = []
    for folder in folders:
        case = Case(name=folder.name, patient_id=folder.name)
        try:
            case.volumes = _acdc_volumes(folder)
        except InvalidVolumeError as err:
            case.error = err
        cases.append(case)
    return cases


def _nifti_stem(path: Path) -> str:
    """``hippocampus_001.nii.gz`` -> ``hippocampus_001``."""
    return re.sub(r"\.nii(\.gz)?$", "", path.name)


def _discover_msd(dataset_dir: Path) -> list[Case]:
    """One case per ``imagesTr/*.nii[.gz]``, its label the same name in ``labelsTr/``."""
    images_dir, labels_dir = dataset_dir / "imagesTr", dataset_dir / "labelsTr"
    for needed in (images_dir, labels_dir):
        if not needed.is_dir():
            raise InvalidVolumeError(needed, "folder not found (the MSD layout needs imagesTr/ and labelsTr/)")
    images = sorted(
        p for p in images_dir.iterdir() if re.search(r"\.nii(\.gz)?$", p.name) and not p.name.startswith(".")
    )
    if not images:
        raise InvalidVolumeError(images_dir, "no .nii/.nii.gz images found")
    cases = []
    for image in images:
        stem = _nifti_stem(image)
        candidate = VolumeCandidate(image, labels_dir / image.name, stem, "none")
        cases.append(Case(name=_relative(image, dataset_dir), patient_id=stem, volumes=[candidate]))
    return cases


def _msd_labels(dataset_dir: Path) -> dict[str, str]:
    """Labels from the MSD ``dataset.json`` when there is one, else the hippocampus labels."""
    description = dataset_dir / "dataset.json"
    if description.is_file():
        labels = json.loads(description.read_text()).get("labels")
        if labels:
            return {str(k): str(v) for k, v in labels.items()}
    return dict(HIPPOCAMPUS_LABELS)


def pseudonymise(identifier: str, salt: str) -> str:
    """Salted SHA-256 (HMAC) pseudonym: ``anon_`` + 16 hex digits; the same input gives the same id."""
    digest = hmac.new(salt.encode(), identifier.encode(), hashlib.sha256).hexdigest()
    return f"anon_{digest[:16]}"


def _resolve_salt(salt: str | None, name: str, warnings: list[str]) -> str:
    """The ``salt`` argument, else the environment's, else the dataset name (with a warning)."""
    chosen = salt or os.environ.get(SALT_ENV)
    if chosen:
        return chosen
    message = (
        f"no private pseudonym salt: patient ids were hashed with the dataset name as salt, which "
        f"anyone can recompute; set {SALT_ENV} (or pass --salt) and rebuild"
    )
    logger.warning(message)
    warnings.append(message)
    return name


def _dicom_case(folder: Path, image_series: str, mask_series: str, salt: str) -> tuple[Case, bool]:
    """One DICOM patient folder as a case; the flag says whether its name holds an identifier."""
    image, mask = folder / image_series, folder / mask_series
    case = Case(name=folder.name, patient_id=pseudonymise(folder.name, salt))
    try:
        for series in (image, mask):
            if not series.is_dir():
                raise InvalidVolumeError(series, "DICOM series folder not found")
        patient_id, patient_name = series_patient_identity(image)
    except InvalidVolumeError as err:
        case.error = err
        return case, False
    case.patient_id = pseudonymise(patient_id or folder.name, salt)
    case.volumes = [VolumeCandidate(image, mask, case.patient_id, "none")]
    identifying = any(ident and ident.lower() in folder.name.lower() for ident in (patient_id, patient_name))
    return case, identifying


def _number_volumes(cases: Sequence[Case]) -> None:
    """Give each DICOM volume the id ``<pseudonym>_<n>`` (n counts a patient's folders, from 1)."""
    seen: dict[str, int] = {}
    for case in cases:
        if case.volumes:
            seen[case.patient_id] = seen.get(case.patient_id, 0) + 1
            case.volumes = [
                VolumeCandidate(v.image, v.label, f"{case.patient_id}_{seen[case.patient_id]}", v.organ_state)
                for v in case.volumes
            ]


def _discover_dicom(
    dataset_dir: Path, image_series: str, mask_series: str, salt: str, warnings: list[str]
) -> list[Case]:
    """One case per patient folder holding an image series folder and a mask series folder."""
    folders = sorted(p for p in dataset_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InvalidVolumeError(dataset_dir, "no patient folders found")
    cases = []
    for folder in folders:
        case, identifying = _dicom_case(folder, image_series, mask_series, salt)
        if identifying:
            message = (
                f"patient {case.patient_id}: the patient folder is named with the DICOM PatientID or "
                f"PatientName, so that identifier shows in this manifest's image/label paths; rename "
                f"the folder (for example to {case.patient_id}) and rebuild (nothing was renamed)"
            )
            logger.warning(message)
            warnings.append(message)
        cases.append(case)
    _number_volumes(cases)
    return cases


# ---------------------------------------------------------------------------------------- build


def _build(
    *,
    name: str,
    layout: str,
    dataset_dir: Path,
    cases: Sequence[Case],
    labels: Mapping[str, str],
    counts: SplitCounts | None,
    seed: int,
    skip_bad: bool,
    preprocessing: Mapping[str, Any] | None,
    warnings: list[str],
) -> BuildResult:
    """Validate the cases, split them by patient and assemble the manifest (shared by all layouts)."""
    split_of = assign_splits((c.patient_id for c in cases), counts or DEFAULT_COUNTS[layout], seed)
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    skipped = []
    for case in cases:
        try:
            entries = _validate_case(case, dataset_dir, labels)
        except InvalidVolumeError as err:
            if not skip_bad:
                raise
            logger.warning("skipping case %s: %s", case.name, err)
            skipped.append({
                "case": case.name,
                "patient_id": case.patient_id,
                "split": split_of.get(case.patient_id, "none"),
                "file": _relative(err.path, dataset_dir),
                "problem": err.problem,
            })
            continue
        if case.patient_id in split_of:
            splits[split_of[case.patient_id]].extend(entries)
    if not any(splits.values()):
        raise InvalidVolumeError(dataset_dir, f"no valid volumes ({len(skipped)} case(s) skipped)")
    manifest: dict[str, Any] = {
        "name": name,
        "layout": layout,
        "labels": dict(labels),
        "meta_labels": list(META_LABELS[layout]),
        "preprocessing": dict(preprocessing or DEFAULT_PREPROCESSING[layout]),
    }
    manifest.update({split: sorted(entries, key=lambda e: e["volume_id"]) for split, entries in splits.items()})
    return BuildResult(manifest=manifest, skipped=skipped, warnings=warnings)


def _dataset_dir(dataset_dir: str | os.PathLike[str]) -> Path:
    """The dataset folder as an absolute path; it must exist."""
    path = Path(dataset_dir).expanduser().absolute()
    if not path.is_dir():
        raise InvalidVolumeError(path, "dataset folder not found")
    return path


def build_acdc_manifest(
    dataset_dir: str | os.PathLike[str],
    *,
    name: str = "acdc",
    counts: SplitCounts | None = None,
    seed: int = SPLIT_SEED,
    skip_bad: bool = True,
    preprocessing: Mapping[str, Any] | None = None,
) -> BuildResult:
    """Build an ACDC manifest: two volumes (ED, ES) per ``patientNNN/`` folder.

    Args:
        dataset_dir: the ACDC ``training`` folder (or any folder of ``patientNNN/``).
        name: manifest name.
        counts: patients per split; default :data:`DEFAULT_COUNTS` ``["acdc"]`` (test 20, train 20,
            val 5, pretrain the rest).
        seed: split seed.
        skip_bad: skip (and report) bad cases instead of raising.
        preprocessing: overrides :data:`DEFAULT_PREPROCESSING` ``["acdc"]``.
    """
    root = _dataset_dir(dataset_dir)
    return _build(name=name, layout="acdc", dataset_dir=root, cases=_discover_acdc(root), labels=ACDC_LABELS,
                  counts=counts, seed=seed, skip_bad=skip_bad, preprocessing=preprocessing, warnings=[])


def build_msd_manifest(
    dataset_dir: str | os.PathLike[str],
    *,
    name: str = "hippocampus",
    labels: Mapping[str, str] | None = None,
    counts: SplitCounts | None = None,
    seed: int = SPLIT_SEED,
    skip_bad: bool = True,
    preprocessing: Mapping[str, Any] | None = None,
) -> BuildResult:
    """Build a manifest for an MSD task folder (``imagesTr/``, ``labelsTr/``), one volume per case.

    Args:
        dataset_dir: the task folder.
        name: manifest name.
        labels: ``{"0": "background", ...}``; default from ``dataset.json``, else hippocampus.
        counts: patients per split; default test 40, train 40, val 10, pretrain the rest.
        seed, skip_bad, preprocessing: as for :func:`build_acdc_manifest`.
    """
    root = _dataset_dir(dataset_dir)
    return _build(name=name, layout="msd", dataset_dir=root, cases=_discover_msd(root),
                  labels=dict(labels) if labels else _msd_labels(root), counts=counts, seed=seed,
                  skip_bad=skip_bad, preprocessing=preprocessing, warnings=[])


def build_dicom_manifest(
    dataset_dir: str | os.PathLike[str],
    *,
    name: str = "dicom_pgbm",
    image_series: str = "FLAIRreg",
    mask_series: str = "MaskTumor",
    labels: Mapping[str, str] | None = None,
    salt: str | None = None,
    counts: SplitCounts | None = None,
    seed: int = SPLIT_SEED,
    skip_bad: bool = True,
    preprocessing: Mapping[str, Any] | None = None,
) -> BuildResult:
    """Build a manifest for a folder of ``<patient>/<image_series>/`` + ``<patient>/<mask_series>/``.

    Args:
        dataset_dir: the folder of patient folders.
        name: manifest name (also the fallback pseudonym salt).
        image_series, mask_series: series folder names inside each patient folder.
        labels: default 0 background, 1 tumour.
        salt: pseudonym salt; default ``$METACONTRAST_PSEUDONYM_SALT``, else ``name`` (warned).
        counts: patients per split; default test 1, val 0, train 1, pretrain the rest.
        seed, skip_bad, preprocessing: as for :func:`build_acdc_manifest`.
    """
    root = _dataset_dir(dataset_dir)
    warnings: list[str] = []
    cases = _discover_dicom(root, image_series, mask_series, _resolve_salt(salt, name, warnings), warnings)
    return _build(name=name, layout="dicom", dataset_dir=root, cases=cases, labels=dict(labels or TUMOUR_LABELS),
                  counts=counts, seed=seed, skip_bad=skip_bad, preprocessing=preprocessing, warnings=warnings)


_BUILDERS: dict[str, Callable[..., BuildResult]] = {
    "acdc": build_acdc_manifest,
    "msd": build_msd_manifest,
    "dicom": build_dicom_manifest,
}


def build_manifest(layout: str, dataset_dir: str | os.PathLike[str], **options: Any) -> BuildResult:
    """Build a manifest for ``layout`` (one of :data:`LAYOUTS`); ``options`` go to its builder."""
    if layout not in _BUILDERS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return _BUILDERS[layout](dataset_dir, **options)


# --------------------------------------------------------------------------------------- writing


def manifest_to_json(data: Mapping[str, Any]) -> str:
    """The canonical text: sorted keys, indent 2, trailing newline."""
    return json.dumps(data, sort_keys=True, indent=2) + "\n"


def report_path(output: str | os.PathLike[str]) -> Path:
    """``data_manifests/acdc.json`` -> ``data_manifests/acdc.report.json``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.report.json")


def write_manifest(result: BuildResult, output: str | os.PathLike[str]) -> Path:
    """Write the manifest (and its report, or remove a stale one) atomically; return the manifest path."""
    output = Path(output)
    manifest_text = manifest_to_json(result.manifest)
    report = result.report()
    report_text = None if report is None else manifest_to_json(report)
    atomic_write_text(output, manifest_text)
    if report_text is None:
        report_path(output).unlink(missing_ok=True)
    else:
        atomic_write_text(report_path(output), report_text)
    return output


def make_manifest(
    layout: str, dataset_dir: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any
) -> BuildResult:
    """Build a manifest and write it (with its report) to ``output``; nothing is written on failure."""
    result = build_manifest(layout, dataset_dir, **options)
    write_manifest(result, output)
    logger.info(
        "wrote %s: %d volumes (%s), %d case(s) skipped", output, result.num_volumes(),
        ", ".join(f"{s} {len(result.manifest[s])}" for s in SPLITS), len(result.skipped),
    )
    return result
