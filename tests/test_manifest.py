"""Manifest builder: counts, splits, byte-identical committed manifests, atomic writes, bad input.

Every manifest is built once per module through the same CLI functions that made the committed
files (``scripts/make_manifest.py``), into a temporary folder.  Bad-input tests corrupt small
copies (three MSD cases from the embedded sample, three ACDC patients, the two DICOM patients).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pydicom
import pytest

from metacontrast.data.dicom import check_series_geometry
from metacontrast.data.discovery import SALT_ENV, parse_info_cfg
from metacontrast.data.manifest import (
    SPLITS,
    InvalidVolumeError,
    SplitCounts,
    assign_splits,
    atomic_write_text,
    build_manifest,
    make_manifest,
    report_path,
)

# name -> (CLI command, fixture giving dataset_dir or None for the embedded sample, CLI options).
# These are exactly the commands that produced data_manifests/*.json (see the module docstring of
# scripts/make_manifest.py); dicom_pgbm is built without a private salt.
COMMITTED = {
    "acdc": ("acdc", "acdc_dir", {}),
    "hippocampus": ("msd", "hippocampus_dir", {"name": "hippocampus"}),
    "dicom_pgbm": ("dicom", "dicom_dir", {"name": "dicom_pgbm"}),
    "sample": ("msd", None, {"name": "sample", "test": 1, "val": 1, "train": 2}),
}
SMALL_COUNTS = SplitCounts(test=1, val=0, train=1)


@pytest.fixture(scope="module")
def cli(repo_root: Path) -> ModuleType:
    """``scripts/make_manifest.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location("make_manifest_cli", repo_root / "scripts" / "make_manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh(
    cli: ModuleType, repo_root: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Callable[[str], Path]:
    """``fresh(name)``: the manifest ``name`` rebuilt by the CLI into a temporary folder (cached)."""
    out_dir = tmp_path_factory.mktemp("fresh_manifests")
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            command, dir_fixture, options = COMMITTED[name]
            dataset_dir = (request.getfixturevalue(dir_fixture) if dir_fixture
                           else repo_root / "sample_data" / "hippocampus")
            with pytest.MonkeyPatch.context() as patch:
                patch.delenv(SALT_ENV, raising=False)
                getattr(cli, command)(dataset_dir=str(dataset_dir), output=str(out_dir / f"{name}.json"), **options)
            built[name] = out_dir / f"{name}.json"
        return built[name]

    return build


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _entries(manifest: dict) -> list[dict]:
    return [entry for split in SPLITS for entry in manifest[split]]


# ------------------------------------------------------------------------------ real datasets


@pytest.mark.parametrize("name", list(COMMITTED))
def test_committed_manifest_equals_fresh_build(name: str, fresh: Callable[[str], Path], repo_root: Path) -> None:
    committed = repo_root / "data_manifests" / f"{name}.json"
    built = fresh(name)
    assert built.read_bytes() == committed.read_bytes()
    assert built.read_bytes().endswith(b"}\n")
    assert report_path(built).exists() == report_path(committed).exists()
    if report_path(built).exists():
        assert report_path(built).read_bytes() == report_path(committed).read_bytes()


@pytest.mark.parametrize("name", list(COMMITTED))
def test_manifest_contract(name: str, repo_root: Path) -> None:
    manifest = _load(repo_root / "data_manifests" / f"{name}.json")
    assert set(manifest) == {"name", "layout", "labels", "meta_labels", "preprocessing", *SPLITS}
    assert manifest["name"] == name
    assert manifest["labels"]["0"] == "background"
    assert manifest["meta_labels"][:2] == ["patient_id", "slice_quantile"]
    assert set(manifest["preprocessing"]) == {"pixel_size", "spatial_size"}
    keys = {"image", "label", "volume_id", "patient_id", "organ_state", "num_slices", "spacing", "shape"}
    for entry in _entries(manifest):
        assert set(entry) == keys
        assert not os.path.isabs(entry["image"]) and not os.path.isabs(entry["label"])
        assert entry["num_slices"] == entry["shape"][2] and len(entry["spacing"]) == 3


@pytest.mark.parametrize("name", list(COMMITTED))
def test_no_patient_in_two_splits(name: str, repo_root: Path) -> None:
    manifest = _load(repo_root / "data_manifests" / f"{name}.json")
    patients = {split: {e["patient_id"] for e in manifest[split]} for split in SPLITS}
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            assert not patients[first] & patients[second], (first, second)
    volume_ids = [e["volume_id"] for e in _entries(manifest)]
    assert len(volume_ids) == len(set(volume_ids))


def test_acdc_counts_and_organ_state(fresh: Callable[[str], Path], acdc_dir: Path) -> None:
    manifest = _load(fresh("acdc"))
    entries = _entries(manifest)
    assert len(entries) == 180
    assert len({e["patient_id"] for e in entries}) == 90
    patients = {split: len({e["patient_id"] for e in manifest[split]}) for split in SPLITS}
    assert patients == {"test": 20, "val": 5, "train": 20, "pretrain": 45}
    for entry in entries:
        info = parse_info_cfg(acdc_dir / entry["patient_id"] / "Info.cfg")
        frame = int(entry["image"].split("_frame")[1][:2])
        assert frame == int(info[entry["organ_state"]]), entry
        assert entry["label"] == entry["image"].replace(".nii.gz", "_gt.nii.gz")
        assert entry["volume_id"] == f"{entry['patient_id']}_{entry['organ_state']}"
    states = sorted(e["organ_state"] for e in entries)
    assert states.count("ED") == states.count("ES") == 90


def test_hippocampus_counts(fresh: Callable[[str], Path]) -> None:
    manifest = _load(fresh("hippocampus"))
    assert len(_entries(manifest)) == 190
    assert {split: len(manifest[split]) for split in SPLITS} == {"test": 40, "val": 10, "train": 40, "pretrain": 100}
    assert {e["organ_state"] for e in _entries(manifest)} == {"none"}


def test_sample_is_a_monai_datalist(repo_root: Path) -> None:
    from monai.data import load_decathlon_datalist

    base_dir = repo_root / "sample_data" / "hippocampus"
    sizes = {}
    for split in SPLITS:
        items = load_decathlon_datalist(str(repo_root / "data_manifests" / "sample.json"), True, split, str(base_dir))
        assert all(Path(item["image"]).is_file() and Path(item["label"]).is_file() for item in items)
        sizes[split] = len(items)
    assert sizes == {"pretrain": 4, "train": 2, "val": 1, "test": 1}


def test_assign_splits_is_deterministic_and_checks_counts() -> None:
    patients = [f"p{i:03d}" for i in range(30)]
    counts = SplitCounts(test=5, val=2, train=3)
    first = assign_splits(patients, counts)
    assert first == assign_splits(reversed(patients), counts)
    assert sorted(first.values()).count("pretrain") == 20 and sorted(first.values()).count("test") == 5
    assert first != assign_splits(patients, counts, seed=1)
    limited = assign_splits(patients, SplitCounts(test=5, val=2, train=3, pretrain=4))
    assert len(limited) == 14
    with pytest.raises(ValueError, match="more patients"):
        assign_splits(patients, SplitCounts(test=20, val=5, train=10))


def test_val_size_moves_no_test_or_train_patient() -> None:
    """val is taken after test and train: growing it only takes patients from pretrain."""
    patients = [f"p{i:03d}" for i in range(30)]
    small = assign_splits(patients, SplitCounts(test=5, val=1, train=6))
    large = assign_splits(patients, SplitCounts(test=5, val=6, train=6))
    for split in ("test", "train"):
        assert {p for p, s in small.items() if s == split} == {p for p, s in large.items() if s == split}
    grown = {p for p, s in large.items() if s == "val"} - {p for p, s in small.items() if s == "val"}
    assert len(grown) == 5 and all(small[p] == "pretrain" for p in grown)


# ---------------------------------------------------------------------------- broken copies


def _writable_copy(source: Path, target: Path, names: list[str] | None = None) -> Path:
    """Copy ``source`` (or only its entries ``names``) to ``target`` with writable files and folders."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()) if names is None else [source / n for n in names]:
        if entry.is_dir():
            _writable_copy(entry, target / entry.name)
        else:
            shutil.copyfile(entry, target / entry.name)
    return target


@pytest.fixture()
def msd_copy(repo_root: Path, tmp_path: Path) -> Path:
    """Three cases of the embedded hippocampus sample, MSD layout."""
    source = repo_root / "sample_data" / "hippocampus"
    names = sorted(p.name for p in (source / "imagesTr").iterdir())[:3]
    for folder in ("imagesTr", "labelsTr"):
        _writable_copy(source / folder, tmp_path / "msd" / folder, names)
    return tmp_path / "msd"


@pytest.fixture()
def acdc_copy(acdc_dir: Path, tmp_path: Path) -> Path:
    """Three ACDC patients."""
    return _writable_copy(acdc_dir, tmp_path / "acdc", ["patient001", "patient002", "patient003"])


@pytest.fixture()
def dicom_copy(dicom_dir: Path, tmp_path: Path) -> Path:
    """Both DICOM patients."""
    return _writable_copy(dicom_dir, tmp_path / "dicom")


def _rewrite_nifti(path: Path, change: Callable[[np.ndarray], np.ndarray], zoom: float = 1.0) -> None:
    """Save ``change(data)`` over ``path``, its affine's first axis scaled by ``zoom``."""
    image = nib.load(path)
    affine = image.affine @ np.diag([zoom, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(change(np.asanyarray(image.dataobj)), affine), path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set_value(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(array: np.ndarray) -> np.ndarray:
        array = array.astype(np.float32 if np.isnan(value) else array.dtype)
        array[0, 0, 0] = value
        return array

    return change


def _middle_slice(series: Path) -> Path:
    """The file of the slice in the middle of a series (by position along the slice normal)."""
    files = check_series_geometry(series).files
    return files[len(files) // 2]


def _set_pixel_spacing(path: Path) -> None:
    header = pydicom.dcmread(path)
    header.PixelSpacing = [0.7, 0.7]
    header.save_as(path)


# Each breaker corrupts one case of a fresh copy of its layout's dataset and returns (the file the
# error must name, relative to the copy; words the problem must contain).
MSD_IMAGE, MSD_LABEL = "imagesTr/hippocampus_001.nii.gz", "labelsTr/hippocampus_001.nii.gz"
BREAKERS: dict[str, tuple[str, Callable[[Path], tuple[str, str]]]] = {}


def _breaker(layout: str) -> Callable[[Callable[[Path], tuple[str, str]]], Callable[[Path], tuple[str, str]]]:
    def register(function: Callable[[Path], tuple[str, str]]) -> Callable[[Path], tuple[str, str]]:
        BREAKERS[function.__name__] = (layout, function)
        return function

    return register


@_breaker("msd")
def truncated_nifti(dataset: Path) -> tuple[str, str]:
    _truncate(dataset / MSD_IMAGE)
    return MSD_IMAGE, "truncated"


@_breaker("msd")
def label_of_other_shape(dataset: Path) -> tuple[str, str]:
    _rewrite_nifti(dataset / MSD_LABEL, lambda array: array[:-1])
    return MSD_LABEL, "label shape"


@_breaker("msd")
def label_of_other_spacing(dataset: Path) -> tuple[str, str]:
    _rewrite_nifti(dataset / MSD_LABEL, lambda array: array, zoom=2.0)
    return MSD_LABEL, "label spacing"


@_breaker("msd")
def all_zero_image(dataset: Path) -> tuple[str, str]:
    _rewrite_nifti(dataset / MSD_IMAGE, np.zeros_like)
    return MSD_IMAGE, "all zeros"


@_breaker("msd")
def nan_image(dataset: Path) -> tuple[str, str]:
    _rewrite_nifti(dataset / MSD_IMAGE, _set_value(np.nan))
    return MSD_IMAGE, "NaN"


@_breaker("msd")
def label_value_7(dataset: Path) -> tuple[str, str]:
    _rewrite_nifti(dataset / MSD_LABEL, _set_value(7))
    return MSD_LABEL, "label values [7] outside the declared classes [0, 1, 2]"


@_breaker("msd")
def missing_label(dataset: Path) -> tuple[str, str]:
    (dataset / MSD_LABEL).unlink()
    return MSD_LABEL, "file not found"


@_breaker("acdc")
def no_info_cfg(dataset: Path) -> tuple[str, str]:
    (dataset / "patient001" / "Info.cfg").unlink()
    return "patient001/Info.cfg", "Info.cfg not found"


@_breaker("acdc")
def frame_number_without_file(dataset: Path) -> tuple[str, str]:
    (dataset / "patient001" / "Info.cfg").write_text("ED: 1\nES: 29\nNbFrame: 30\n")
    return "patient001/Info.cfg", "ES frame 29 matches no file"


@_breaker("dicom")
def dicom_missing_slice(dataset: Path) -> tuple[str, str]:
    _middle_slice(dataset / "PGBM-001" / "FLAIRreg").unlink()
    return "PGBM-001/FLAIRreg", "missing slice"


@_breaker("dicom")
def dicom_pixel_spacing_changed(dataset: Path) -> tuple[str, str]:
    changed = _middle_slice(dataset / "PGBM-001" / "MaskTumor")
    _set_pixel_spacing(changed)
    return changed.relative_to(dataset).as_posix(), "inconsistent spacing"


def _salt(layout: str) -> dict[str, str]:
    """A private salt for DICOM builds (the other layouts take none)."""
    return {"salt": "test salt"} if layout == "dicom" else {}


@pytest.fixture(params=list(BREAKERS))
def broken(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path, str, str]]:
    """(layout, broken dataset copy, file the error must name relative to it, problem words)."""
    layout, breaker = BREAKERS[request.param]
    dataset = request.getfixturevalue(f"{layout}_copy")
    bad_file, problem = breaker(dataset)
    yield layout, dataset, bad_file, problem


def test_bad_input_raises_naming_file_and_problem(broken: tuple[str, Path, str, str]) -> None:
    layout, dataset, bad_file, problem = broken
    with pytest.raises(InvalidVolumeError) as caught:
        build_manifest(layout, dataset, counts=SMALL_COUNTS, skip_bad=False, **_salt(layout))
    assert caught.value.path == dataset / bad_file
    assert str(dataset / bad_file) in str(caught.value)
    assert problem in caught.value.problem


def test_bad_input_is_skipped_and_reported(broken: tuple[str, Path, str, str], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    layout, dataset, bad_file, problem = broken
    output = tmp_path / "out" / "broken.json"
    result = make_manifest(layout, dataset, output, name="broken", counts=SMALL_COUNTS, **_salt(layout))
    case = bad_file.split("/")[0] if layout != "msd" else bad_file.replace("labelsTr", "imagesTr")
    assert [(s["case"], s["file"]) for s in result.skipped] == [(case, bad_file)]
    assert problem in result.skipped[0]["problem"]
    assert any("skipping case" in r.getMessage() and bad_file.split("/")[-1] in r.getMessage() for r in caplog.records)
    report = _load(report_path(output))
    assert report["skipped"] == result.skipped
    manifest = _load(output)
    assert _entries(manifest)
    assert all(case not in (e["image"], e["image"].split("/")[0]) for e in _entries(manifest))


# ------------------------------------------------------------------------------- atomic writes


def test_failed_build_leaves_old_manifest_intact(msd_copy: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "m.json"
    make_manifest("msd", msd_copy, output, name="m", counts=SMALL_COUNTS)
    before = output.read_bytes()
    assert not report_path(output).exists()
    _truncate(msd_copy / MSD_IMAGE)
    with pytest.raises(InvalidVolumeError, match="truncated"):
        make_manifest("msd", msd_copy, output, name="m", counts=SMALL_COUNTS, skip_bad=False)
    for image in sorted((msd_copy / "imagesTr").iterdir())[1:]:  # every case bad: nothing to write
        _rewrite_nifti(image, np.zeros_like)
    with pytest.raises(InvalidVolumeError, match="no valid volumes"):
        make_manifest("msd", msd_copy, output, name="m", counts=SMALL_COUNTS)
    assert output.read_bytes() == before
    assert sorted(p.name for p in output.parent.iterdir()) == ["m.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "half written \ud800")  # fails while writing the temporary file
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_stale_report_is_removed_when_fixed(msd_copy: Path, tmp_path: Path) -> None:
    output = tmp_path / "m.json"
    original = (msd_copy / MSD_IMAGE).read_bytes()
    _truncate(msd_copy / MSD_IMAGE)
    make_manifest("msd", msd_copy, output, name="m", counts=SMALL_COUNTS)
    assert report_path(output).exists()
    (msd_copy / MSD_IMAGE).write_bytes(original)
    make_manifest("msd", msd_copy, output, name="m", counts=SMALL_COUNTS)
    assert not report_path(output).exists()
    assert len(_entries(_load(output))) == 3
