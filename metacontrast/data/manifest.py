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

Modules
    Finding the cases of a layout and pseudonymising DICOM patients: :mod:`metacontrast.data.discovery`;
    reading and checking a case's volumes: :mod:`metacontrast.data.volume_check`.

Writes
    JSON with sorted keys, indent 2 and a trailing newline, so a rerun is byte-identical.  Both
    files are written atomically (temporary file in the same folder, then ``os.replace``): a build
    that fails, or a write that fails, leaves the previous manifest as it was.  A stale report from
    an earlier run is removed when a rerun has nothing to report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metacontrast.data.discovery import discover_acdc, discover_dicom, discover_msd, msd_labels, resolve_salt
from metacontrast.data.errors import InvalidVolumeError
from metacontrast.data.volume_check import Case, relative, validate_case
from metacontrast.io import atomic_write_text

__all__ = [
    "ACDC_LABELS",
    "DEFAULT_COUNTS",
    "DEFAULT_PREPROCESSING",
    "LAYOUTS",
    "SPLITS",
    "SPLIT_SEED",
    "TUMOUR_LABELS",
    "BuildResult",
    "InvalidVolumeError",
    "SplitCounts",
    "assign_splits",
    "atomic_write_text",
    "build_acdc_manifest",
    "build_dicom_manifest",
    "build_manifest",
    "build_msd_manifest",
    "make_manifest",
    "manifest_to_json",
    "report_path",
    "write_manifest",
]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("pretrain", "train", "val", "test")
SPLIT_SEED = 0
"""Seed of the patient permutation behind every committed manifest's splits."""


ACDC_LABELS: dict[str, str] = {"0": "background", "1": "RV", "2": "Myo", "3": "LV"}
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
            entries = validate_case(case, dataset_dir, labels)
        except InvalidVolumeError as err:
            if not skip_bad:
                raise
            logger.warning("skipping case %s: %s", case.name, err)
            skipped.append({
                "case": case.name,
                "patient_id": case.patient_id,
                "split": split_of.get(case.patient_id, "none"),
                "file": relative(err.path, dataset_dir),
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
    return _build(name=name, layout="acdc", dataset_dir=root, cases=discover_acdc(root), labels=ACDC_LABELS,
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
    return _build(name=name, layout="msd", dataset_dir=root, cases=discover_msd(root),
                  labels=dict(labels) if labels else msd_labels(root), counts=counts, seed=seed,
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
    cases = discover_dicom(root, image_series, mask_series, resolve_salt(salt, name, warnings), warnings)
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
