"""Finding the cases of a dataset folder by layout (``acdc``, ``msd``, ``dicom``), and pseudonymising DICOM
patients (see :mod:`metacontrast.data.manifest`'s "Layouts" and "DICOM pseudonymisation")."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from metacontrast.data.dicom import series_patient_identity
from metacontrast.data.errors import InvalidVolumeError
from metacontrast.data.volume_check import Case, VolumeCandidate, relative

__all__ = ["HIPPOCAMPUS_LABELS", "SALT_ENV", "discover_acdc", "discover_dicom", "discover_msd", "msd_labels", "parse_info_cfg", "pseudonymise", "resolve_salt"]

logger = logging.getLogger(__name__)

SALT_ENV = "METACONTRAST_PSEUDONYM_SALT"
HIPPOCAMPUS_LABELS: dict[str, str] = {"0": "background", "1": "anterior", "2": "posterior"}


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


def discover_acdc(dataset_dir: Path) -> list[Case]:
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


def discover_msd(dataset_dir: Path) -> list[Case]:
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
        cases.append(Case(name=relative(image, dataset_dir), patient_id=stem, volumes=[candidate]))
    return cases


def msd_labels(dataset_dir: Path) -> dict[str, str]:
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


def resolve_salt(salt: str | None, name: str, warnings: list[str]) -> str:
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


def discover_dicom(
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
