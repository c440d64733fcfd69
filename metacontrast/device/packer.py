"""Write what a device run needs into one git-ignored folder (default ``device_data/``) that travels with the call.

* ``<dataset>_pack/`` -- a slice pack (:mod:`metacontrast.data.pack`) of the manifest's splits at the requested
  preprocessing: pre-training slices without labels, the labelled splits with theirs;
* ``site.tar.xz`` -- the packages the host's Python lacks, as an unpacked ``site-packages`` tree: their wheels
  (pure Python, or cp312 manylinux where compiled) are downloaded here with ``pip download`` for the host's
  interpreter (``python_version``), unzipped, stripped of their test suites, and xz-compressed: 15 MB instead of
  the wheels' 23 MB, which decides whether the call fits in 64 MiB.  The host extracts it and puts it first on
  ``PYTHONPATH``: no ``pip`` and no network there;
* ``manifest.json`` -- what was packed: sizes, sha256 of every file, the command that made it.

The host has PyTorch (and numpy, scipy, matplotlib, scikit-learn, pyyaml, requests, tqdm); it lacks MONAI,
pytorch-ignite, nibabel, pydicom, fire and MLflow (``docs/device.md``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from metacontrast.data.pack import write_slice_pack
from metacontrast.data.slices import build_slice_cache
from metacontrast.io import atomic_write_text

__all__ = ["DEVICE_WHEELS", "MLFLOW_WHEELS", "build_site", "download_wheels", "pack_dataset", "write_manifest"]

DEVICE_WHEELS = ("monai==1.6.1", "pytorch-ignite==0.5.5", "nibabel==5.4.2", "fire==0.7.1", "termcolor==3.2.0")
"""Installed without their dependencies (the host has torch and numpy; pins as in requirements.txt).  pydicom is
left out: a slice pack needs no DICOM reading."""

MLFLOW_WHEELS = ("mlflow-skinny==3.17.2", "sqlalchemy==2.1.9", "alembic==1.20.1")
"""Installed with their dependencies, less those the host already has (:data:`HOST_HAS`)."""

HOST_HAS = ("numpy", "pyyaml", "requests", "urllib3", "idna", "certifi", "charset_normalizer", "packaging",
            "typing_extensions", "markupsafe", "protobuf")
"""Distributions on the host image (or not needed there) whose downloaded wheels are dropped."""

_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pack_dataset(
    manifest_path: str | Path,
    dataset_dir: str | Path,
    out_dir: str | Path,
    dataset: str,
    pixel_size: Sequence[float],
    spatial_size: Sequence[int],
    splits: Sequence[str] = ("pretrain", "train", "val", "test"),
    cache_dir: str | Path | None = ".cache/slices",
    scored_splits: Sequence[str] = ("test",),
) -> Path:
    """Preprocess ``splits`` of the manifest (through the shared slice cache) and write them as one slice pack.

    Labelled splits are read first, so a volume in both a labelled split and ``pretrain`` is packed with its label.
    The volumes of ``scored_splits`` (packed among ``splits``) also carry their source label file, so that
    ``evaluate`` can score them on their source grid from the pack (:mod:`metacontrast.data.pack`).
    """
    manifest = json.loads(Path(manifest_path).read_text())
    absent = [s for s in scored_splits if s not in splits]
    if absent:
        raise ValueError(f"scored splits {absent} are not among the packed splits {list(splits)}")
    ordered = sorted(splits, key=lambda s: s == "pretrain")
    volumes = []
    for split in ordered:
        entries = manifest[split]
        if not entries:
            continue
        labelled = split != "pretrain"
        cache = build_slice_cache(entries, dataset_dir, pixel_size, spatial_size, with_labels=labelled, cache_dir=cache_dir)
        for v, entry in enumerate(cache.volumes):
            idx = (cache.meta["volume_index"] == v).nonzero().flatten()
            idx = idx[cache.meta["slice_index"][idx].argsort()]
            volumes.append((entry, cache.images[idx], cache.labels[idx] if labelled else None))
    labels = {str(e["volume_id"]): source_label_file(e, dataset_dir) for split in scored_splits for e in manifest[split]}
    return write_slice_pack(volumes, out_dir, dataset, pixel_size, spatial_size, source_labels=labels)


def source_label_file(entry: dict[str, Any], dataset_dir: str | Path) -> Path:
    """The NIfTI label of a manifest entry, checked to share its image's grid (shape and affine): the grid a
    prediction scored from the pack is mapped back to is read off the label's header."""
    image, label = Path(dataset_dir) / entry["image"], Path(dataset_dir) / entry["label"]
    if not label.name.endswith((".nii", ".nii.gz")) or not image.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{label}: only NIfTI images and labels can be scored from a slice pack")
    image_header, label_header = nib.load(image), nib.load(label)
    if image_header.shape[:3] != label_header.shape[:3] or not np.allclose(image_header.affine, label_header.affine, atol=1e-4):
        raise ValueError(f"{label}: its grid (shape {label_header.shape}, affine {label_header.affine.tolist()}) differs from "
                         f"its image {image} (shape {image_header.shape}, affine {image_header.affine.tolist()})")
    return label


def _wanted(wheel: Path) -> bool:
    dist = wheel.name.split("-")[0].lower().replace("-", "_")
    return dist not in HOST_HAS


def download_wheels(out_dir: str | Path, python_version: str = "3.12") -> list[Path]:
    """``pip download`` :data:`DEVICE_WHEELS` (no dependencies) and :data:`MLFLOW_WHEELS` (with them) for the host."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", python_version,
            "--implementation", "cp", *[a for p in _PLATFORMS for a in ("--platform", p)], "-d", str(out)]
    subprocess.run([*base, "--no-deps", *DEVICE_WHEELS], check=True)
    subprocess.run([*base, *MLFLOW_WHEELS], check=True)
    for wheel in out.glob("*.whl"):
        if not _wanted(wheel):
            wheel.unlink()
    return sorted(out.glob("*.whl"))


def build_site(out_file: str | Path, python_version: str = "3.12") -> Path:
    """Download the wheels (:func:`download_wheels`), unzip them into one tree without test suites, write ``out_file`` (xz tar)."""
    out_file = Path(out_file)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        for wheel in download_wheels(Path(tmp) / "wheels", python_version):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        for junk in [*site.glob("*/tests"), *site.rglob("__pycache__")]:
            shutil.rmtree(junk, ignore_errors=True)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        partial = out_file.with_name(out_file.name + ".partial")
        with tarfile.open(partial, "w:xz") as tar:
            tar.add(site, arcname=".")
        partial.replace(out_file)
    return out_file


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: str | Path, command: str) -> dict[str, Any]:
    """Record every file under ``root`` (size, sha256) and the command, in ``root/manifest.json``."""
    root = Path(root)
    files = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    record = {"command": command, "total_bytes": sum(f["bytes"] for f in files.values()), "files": files}
    atomic_write_text(root / "manifest.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
