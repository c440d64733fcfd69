"""DICOM series: geometry, mask alignment, MONAI loading, geometry errors, pseudonymised manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from metacontrast.data.dicom import (
    DICOM_READER,
    NIFTI_READER,
    check_series_geometry,
    load_volume,
    reader_for,
)
from metacontrast.data.errors import InvalidVolumeError
from metacontrast.data.discovery import SALT_ENV, pseudonymise
from metacontrast.data.manifest import SPLITS, build_dicom_manifest

PATIENTS = ("PGBM-001", "PGBM-003")


@pytest.fixture(scope="module")
def volumes(dicom_dir: Path) -> dict[str, tuple]:
    """``{patient: (image, mask)}`` as loaded by :func:`load_volume`."""
    return {p: (load_volume(dicom_dir / p / "FLAIRreg"), load_volume(dicom_dir / p / "MaskTumor")) for p in PATIENTS}


@pytest.fixture()
def flair_copy(dicom_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of PGBM-001's FLAIR series."""
    target = tmp_path / "FLAIRreg"
    target.mkdir()
    for source in (dicom_dir / "PGBM-001" / "FLAIRreg").iterdir():
        shutil.copyfile(source, target / source.name)
    return target


def test_flair_reads_as_24_slices_at_0_6875_mm(dicom_dir: Path, volumes: dict[str, tuple]) -> None:
    image, _ = volumes["PGBM-001"]
    assert tuple(image.shape) == (260, 320, 24)
    np.testing.assert_allclose(image.pixdim[:2], [0.6875, 0.6875], atol=1e-6)
    np.testing.assert_allclose(float(image.pixdim[2]), 6.5, atol=1e-4)
    geometry = check_series_geometry(dicom_dir / "PGBM-001" / "FLAIRreg")
    assert geometry.num_slices == 24 and geometry.shape == tuple(image.shape)
    np.testing.assert_allclose(geometry.spacing, image.pixdim, atol=1e-4)


@pytest.mark.parametrize("patient", PATIENTS)
def test_mask_lands_on_the_image_grid(patient: str, volumes: dict[str, tuple]) -> None:
    image, mask = volumes[patient]
    assert image.shape == mask.shape
    np.testing.assert_allclose(np.asarray(image.affine), np.asarray(mask.affine), atol=1e-4)
    assert set(np.unique(mask.numpy()).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("patient", PATIENTS)
def test_mask_overlaps_the_brain(patient: str, volumes: dict[str, tuple]) -> None:
    image, mask = volumes[patient]
    image, inside = image.numpy(), mask.numpy() > 0
    brain = image > image.mean()  # a coarse head/background split
    assert inside.sum() > 100
    assert (brain & inside).sum() / inside.sum() > 0.9
    assert image[inside].mean() > 1.5 * image.mean()


def test_monai_loadimaged_reads_dicom_folders(dicom_dir: Path, volumes: dict[str, tuple], repo_root: Path) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    items = load_decathlon_datalist(str(repo_root / "data_manifests" / "dicom_pgbm.json"), True, "test", str(dicom_dir))
    explicit = LoadImaged(keys=["image", "label"], reader=DICOM_READER, image_only=True)(items[0])
    automatic = LoadImaged(keys=["image", "label"], image_only=True)(items[0])
    patient = Path(items[0]["image"]).parent.name
    for loaded in (explicit, automatic):
        np.testing.assert_array_equal(loaded["image"].numpy(), volumes[patient][0].numpy())
        np.testing.assert_allclose(np.asarray(loaded["label"].affine), np.asarray(volumes[patient][1].affine))


def test_reader_for(dicom_dir: Path, repo_root: Path) -> None:
    assert reader_for(dicom_dir / "PGBM-001" / "FLAIRreg") == DICOM_READER == "ITKReader"
    assert reader_for(repo_root / "sample_data/hippocampus/imagesTr/hippocampus_001.nii.gz") == NIFTI_READER


def _by_position(series: Path) -> list[Path]:
    return list(check_series_geometry(series).files)


def test_missing_slice_is_refused(flair_copy: Path) -> None:
    files = _by_position(flair_copy)
    files[10].unlink()
    with pytest.raises(InvalidVolumeError, match="missing slice") as caught:
        check_series_geometry(flair_copy)
    assert caught.value.path == flair_copy and str(flair_copy) in str(caught.value)
    assert files[9].name in str(caught.value) and files[11].name in str(caught.value)
    with pytest.raises(InvalidVolumeError, match="missing slice"):
        load_volume(flair_copy)


def test_inconsistent_pixel_spacing_names_the_slice(flair_copy: Path) -> None:
    changed = _by_position(flair_copy)[5]
    header = pydicom.dcmread(changed)
    header.PixelSpacing = [0.7, 0.7]
    header.save_as(changed)
    with pytest.raises(InvalidVolumeError, match="inconsistent spacing: PixelSpacing") as caught:
        check_series_geometry(flair_copy)
    assert caught.value.path == changed


def test_uneven_slice_position_is_refused(flair_copy: Path) -> None:
    geometry = check_series_geometry(flair_copy)
    moved = geometry.files[7]
    header = pydicom.dcmread(moved)
    normal = np.cross(geometry.orientation[:3], geometry.orientation[3:])
    header.ImagePositionPatient = [float(v) for v in np.asarray(header.ImagePositionPatient, float) + 2.0 * normal]
    header.save_as(moved)
    with pytest.raises(InvalidVolumeError, match="inconsistent slice spacing"):
        check_series_geometry(flair_copy)


def test_two_series_in_one_folder_are_refused_without_printing_uids(flair_copy: Path) -> None:
    changed = _by_position(flair_copy)[3]
    header = pydicom.dcmread(changed)
    header.SeriesInstanceUID = "1.2.3.4.5"
    header.save_as(changed)
    with pytest.raises(InvalidVolumeError, match="more than one series") as caught:
        check_series_geometry(flair_copy)
    assert caught.value.path == changed and "1.2.3.4.5" not in str(caught.value)


def test_stray_file_is_refused(flair_copy: Path) -> None:
    (flair_copy / "notes.txt").write_text("not DICOM")
    with pytest.raises(InvalidVolumeError, match="not a readable DICOM file") as caught:
        check_series_geometry(flair_copy)
    assert caught.value.path == flair_copy / "notes.txt"


def _identifiers(dicom_dir: Path) -> set[str]:
    """PatientID, PatientName, StudyDate and UIDs of every series, as written in the headers."""
    values = set()
    for path in dicom_dir.glob("*/*/*"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in ("PatientID", "PatientName", "StudyDate", "PatientBirthDate", "StudyInstanceUID",
                    "SeriesInstanceUID", "SOPInstanceUID"):
            value = str(header.get(tag, "") or "")
            values.update({value} if value else set())
    return values


def test_manifest_and_report_hold_no_identifiers(dicom_dir: Path, repo_root: Path) -> None:
    manifest_path = repo_root / "data_manifests" / "dicom_pgbm.json"
    report_text = (repo_root / "data_manifests" / "dicom_pgbm.report.json").read_text()
    manifest = json.loads(manifest_path.read_text())
    entries = [entry for split in SPLITS for entry in manifest[split]]
    assert len(entries) == 2 and {e["image"].split("/")[1] for e in entries} == {"FLAIRreg"}
    # image/label paths must stay usable, so they keep the folder names (which are the PatientIDs
    # here, as the report says); nothing else may hold an identifier.
    without_paths = json.dumps([{k: v for k, v in e.items() if k not in ("image", "label")} for e in entries])
    without_paths += json.dumps({k: v for k, v in manifest.items() if k not in SPLITS})
    identifiers = _identifiers(dicom_dir)
    assert {"PGBM-001", "PGBM-003"} <= identifiers
    for value in identifiers:
        assert value not in without_paths and value not in report_text, value
        assert value in PATIENTS or value not in manifest_path.read_text(), value
    report = json.loads(report_text)
    assert sum("named with the DICOM PatientID" in w for w in report["warnings"]) == 2
    assert any(SALT_ENV in w for w in report["warnings"])


def test_pseudonyms_depend_on_the_salt(dicom_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pseudonymise("PGBM-001", "a") == pseudonymise("PGBM-001", "a") != pseudonymise("PGBM-001", "b")
    assert "PGBM" not in pseudonymise("PGBM-001", "a")
    monkeypatch.setenv(SALT_ENV, "private")
    result = build_dicom_manifest(dicom_dir)
    ids = {e["patient_id"] for split in SPLITS for e in result.manifest[split]}
    assert ids == {pseudonymise(p, "private") for p in PATIENTS}
    assert not any(SALT_ENV in w for w in result.warnings)
