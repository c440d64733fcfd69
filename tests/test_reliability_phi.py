"""Patient identifiers stay out of every output (issue 8, item 4), end to end on the DICOM series.

The pipeline runs on ``dicom_pgbm`` as a user would: build the manifest, pre-train GCL on its ``train``
split (the series has no ``pretrain`` patients), fine-tune from that encoder, evaluate on ``test``,
export.
Then every file written -- manifest and report, slice cache, checkpoints, MLflow store (SQLite) and
artifacts, CSV/JSON results, NIfTI predictions (decompressed), and the captured console log of all
steps -- is searched for the identifying values read from the series' headers with pydicom:
PatientID, PatientName, StudyDate, and the birth date and accession number where present.

What the test allows, and why (checked precisely, not skipped):

* In TCIA's layout the patient folders are named with the PatientID (``PGBM-001/FLAIRreg``).  A
  manifest must point at the user's files, so its ``image``/``label`` paths, and the slice cache that
  stores the manifest entries it was built from, contain the folder name; the builder reports this
  and asks the user to rename the folders (it never renames their data).  Those path values are the
  only places an identifier may appear, and the test checks that they are the only ones.  A second
  manifest, built from the same series under renamed folders (as the report advises), must be clean
  everywhere.
* Everything the workflows write themselves (checkpoints, MLflow params/tags/metrics/artifacts,
  tables, predictions, logs) must hold no identifier at all: patients and volumes appear only as
  salted pseudonyms (``anon_<hash>``), prediction files are named by them, and no datalist entry or
  path of the user's data is logged.

When the exporter (``metacontrast.export``) is present, the fine-tuned run is exported as a Model Zoo
bundle inside the searched tree too; without it that step is reported as skipped.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch

from monai.bundle import run as run_bundle

from metacontrast.data.manifest import make_manifest
from tests.helpers import in_repo

pytestmark = pytest.mark.slow

FEATURES = [8, 16, 32, 64, 128]
NAME = "phi_dicom"
SALT = "test-private-salt"
IDENTIFYING = ("PatientID", "PatientName", "StudyDate", "PatientBirthDate", "AccessionNumber")




@contextlib.contextmanager
def console_log(log: io.StringIO) -> Iterator[None]:
    """Everything the steps print, log or warn: stdout, stderr, every logger's records (MONAI's and
    MLflow's loggers keep their own handlers, some not propagating) and Python warnings."""
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    levels = {lg: lg.level for lg in loggers}
    for lg in loggers:
        lg.addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        log.writelines(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    finally:
        for lg in [logging.getLogger()] + [x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger)]:
            lg.removeHandler(handler)
        for lg, level in levels.items():
            lg.setLevel(level)


def identifiers(dicom_dir: Path) -> set[str]:
    """The identifying values of every series, read from the DICOM headers."""
    values: set[str] = set()
    for series in sorted(p for p in dicom_dir.glob("*/*") if p.is_dir()):
        first = next(f for f in sorted(series.iterdir()) if f.is_file())
        header = pydicom.dcmread(first, stop_before_pixels=True)
        for keyword in IDENTIFYING:
            value = str(header.get(keyword, "") or "").strip()
            if value:
                values.add(value)
                values.update(part for part in value.split("^") if len(part) >= 4)  # PN components
    return values


def readable_bytes(path: Path) -> bytes:
    """A file's bytes as a reader would find identifiers in them: gzip and zip (torch .pt) members opened."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data += gzip.decompress(data)
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            data += b"".join(archive.read(member) for member in archive.namelist())
    return data


def hits(data: bytes, values: set[str]) -> set[str]:
    lower = data.lower()
    return {v for v in values if v.lower().encode() in lower}


def strings(obj: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """``(location, string)`` for every string in a nested structure of dicts and lists."""
    if isinstance(obj, str):
        yield where, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from strings(str(key), f"{where}.<key>")
            yield from strings(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for k, value in enumerate(obj):
            yield from strings(value, f"{where}[{k}]")


def path_field(location: str) -> bool:
    """``...[k].image`` / ``...[k].label``: a datalist entry's path to the user's data."""
    return location.endswith(".image") or location.endswith(".label")


def export_step(out: Path, finetune: dict[str, Any]) -> Path | Exception | None:
    """Export the fine-tuned run as a Model Zoo bundle under ``out/export``: its folder, the exporter's
    error (reported by the export test alone), or ``None`` when this checkout has no exporter."""
    try:
        from metacontrast.export.bundle import export_bundle
    except ImportError:
        return None
    run_id = json.loads((Path(finetune["output_dir"]) / "finetune_run.json").read_text())["mlflow_run_id"]
    try:
        return Path(export_bundle(dest=str(out / "export" / "bundle"), run_id=run_id, tracking_uri=finetune["tracking_uri"], results_dir=None))
    except Exception as err:  # noqa: BLE001
        return err


@pytest.fixture(scope="module")
def pipeline(repo_root: Path, dicom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("phi")
    out = root / "outputs"
    manifest = out / "manifests" / f"{NAME}.json"
    log = io.StringIO()
    common = {
        "dataset": NAME, "datalist": str(manifest), "dataset_dir": str(dicom_dir), "features": FEATURES,
        "preprocessing_overrides": {NAME: {"pixel_size": [2.75, 2.75], "spatial_size": [80, 80]}},
        "cache_dir": str(out / "cache"), "tracking_uri": f"sqlite:///{out / 'mlflow' / 'mlruns.db'}", "num_threads": 1,
    }  # fmt: skip
    finetune = {**common, "method": "gcl", "num_labeled": 1, "max_iterations": 2, "batch_size": 8,
                "runs_dir": str(out / "runs"), "output_dir": str(out / "finetune"),
                "pretrained_ckpt": str(out / "pretrain" / "encoder.pt")}  # fmt: skip
    (out / "mlflow").mkdir(parents=True)
    with in_repo(repo_root), console_log(log):
        make_manifest("dicom", dicom_dir, manifest, name=NAME, salt=SALT)
        run_bundle(config_file="bundles/gcl/configs/pretrain.json", **common, pretrain_split="train", max_iterations=2,
                   batch_size=4, output_dir=str(out / "pretrain"))
        run_bundle(config_file="bundles/common/configs/finetune.json", **finetune)
        run_bundle(config_file="bundles/common/configs/evaluate.json", **finetune)
        exported = export_step(out, finetune)
    (out / "console.log").write_text(log.getvalue())
    # the same series under renamed patient folders, as the manifest report advises
    renamed = root / "renamed"
    for k, patient in enumerate(sorted(p for p in dicom_dir.iterdir() if p.is_dir())):
        (renamed / f"case{k}").mkdir(parents=True)
        for series in patient.iterdir():
            (renamed / f"case{k}" / series.name).symlink_to(series, target_is_directory=True)
    make_manifest("dicom", renamed, root / "renamed_manifest.json", name=NAME, salt=SALT)
    return {"out": out, "manifest": manifest, "renamed_manifest": root / "renamed_manifest.json", "log": log.getvalue(),
            "exported": exported}  # fmt: skip


def test_identifiers_are_read_from_the_headers(dicom_dir: Path) -> None:
    values = identifiers(dicom_dir)
    assert {"PGBM-001", "PGBM-003", "19920402", "19950329"} <= values, values  # the test searches for something real


def test_pipeline_wrote_what_it_should(pipeline: dict[str, Any]) -> None:
    out = pipeline["out"]
    for path in ("pretrain/encoder.pt", "finetune/model.pt", "finetune/evaluation/metrics.csv", "mlflow/mlruns.db", "console.log"):
        assert (out / path).is_file(), path
    assert list((out / "finetune" / "evaluation" / "predictions").glob("anon_*.nii.gz")), "predictions are named by pseudonym"
    assert list((out / "mlflow").rglob("config.json")), "MLflow artifacts are part of the search"


def output_hits(folder: Path, values: set[str], skip: set[Path] = frozenset()) -> dict[str, list[str]]:
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p not in skip):
        matched = hits(readable_bytes(path), values)
        if matched:
            found[str(path.relative_to(folder))] = sorted(matched)
    return found


def test_no_identifier_in_any_workflow_output(pipeline: dict[str, Any], dicom_dir: Path) -> None:
    """Checkpoints, MLflow store and artifacts, tables, predictions, run state files and the console log."""
    values = identifiers(dicom_dir)
    out = pipeline["out"]
    cache = set((out / "cache").glob("*"))  # checked field by field below
    searched = [p for p in out.rglob("*") if p.is_file() and p != pipeline["manifest"] and p not in cache and "export" not in p.parts]
    assert len(searched) > 15, searched
    found = output_hits(out, values, skip={pipeline["manifest"], *cache, *(out / "export").rglob("*")})
    assert not found, f"identifiers in outputs: {found}"


def test_no_identifier_in_the_exported_bundle(pipeline: dict[str, Any], dicom_dir: Path) -> None:
    if pipeline["exported"] is None:
        pytest.skip("no exporter (metacontrast.export) in this checkout: the export step was not run")
    exported = pipeline["exported"]
    if isinstance(exported, Exception):
        raise AssertionError(f"the export step failed: {exported!r}") from exported
    values = identifiers(dicom_dir)
    assert any(exported.rglob("*.json")) and any(exported.rglob("*.pt")), "an exported bundle to search"
    found = output_hits(exported, values)
    assert not found, f"identifiers in the exported bundle: {found}"


def test_manifest_and_cache_hold_identifiers_only_in_data_paths(pipeline: dict[str, Any], dicom_dir: Path) -> None:
    values = identifiers(dicom_dir)
    manifest = json.loads(pipeline["manifest"].read_text())
    leaks = [(where, s) for where, s in strings(manifest) if hits(s.encode(), values) and not path_field(where)]
    assert not leaks, leaks
    in_paths = [(where, s) for where, s in strings(manifest) if hits(s.encode(), values)]
    assert in_paths, "the TCIA folder names hold the PatientID: the paths must show it (else this check proves nothing)"
    report = pipeline["manifest"].with_name(f"{NAME}.report.json")
    assert "rename the folder" in report.read_text() and not hits(report.read_bytes(), values)
    assert all(e["patient_id"].startswith("anon_") and e["volume_id"].startswith("anon_")
               for split in ("pretrain", "train", "val", "test") for e in manifest[split])  # fmt: skip

    caches = list((pipeline["out"] / "cache").glob("*.pt"))
    assert caches
    for cache in caches:
        state = torch.load(cache, map_location="cpu", weights_only=True)
        leaks = [(where, s) for where, s in strings({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})
                 if hits(s.encode(), values) and not path_field(where)]  # fmt: skip
        assert not leaks, (cache.name, leaks)


def test_manifest_of_renamed_folders_is_clean(pipeline: dict[str, Any], dicom_dir: Path) -> None:
    path = pipeline["renamed_manifest"]
    assert not hits(path.read_bytes(), identifiers(dicom_dir))
    assert not path.with_name(path.stem + ".report.json").exists() or "rename" not in path.with_name(path.stem + ".report.json").read_text()
