"""Build a dataset manifest (``data_manifests/<name>.json``) from a raw dataset folder.

Usage, from the repository root::

    python scripts/make_manifest.py acdc  --dataset_dir /data/acdc/training
    python scripts/make_manifest.py msd   --dataset_dir /data/Task04_Hippocampus --name hippocampus
    python scripts/make_manifest.py dicom --dataset_dir /data/dicom_pgbm --name dicom_pgbm [--salt SECRET]

Common options: ``--output PATH`` (default ``data_manifests/<name>.json`` in this repository),
``--skip_bad True|False`` (skip and report bad cases, or stop at the first), ``--test/--val/--train
N`` and ``--pretrain N`` (patients per split; pretrain defaults to the rest), ``--seed N``,
``--pixel_size '[a,b]' --spatial_size '[h,w]'``.  The logic lives in
:mod:`metacontrast.data.manifest`; this file only maps the command line onto it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as `python scripts/make_manifest.py` without install
    sys.path.insert(0, str(REPO_ROOT))

import fire  # noqa: E402

from metacontrast.data.manifest import (  # noqa: E402
    DEFAULT_COUNTS,
    DEFAULT_PREPROCESSING,
    SPLIT_SEED,
    SPLITS,
    SplitCounts,
    make_manifest,
)


def _run(layout: str, dataset_dir: str, name: str, output: str | None, split: dict[str, int | None],
         pixel_size: list[float] | None, spatial_size: list[int] | None, **options: Any) -> str:
    """Shared body of the three commands: assemble options, build, write, summarise."""
    default = DEFAULT_COUNTS[layout]
    counts = SplitCounts(**{key: getattr(default, key) if value is None else int(value)
                            for key, value in split.items()})
    preprocessing = dict(DEFAULT_PREPROCESSING[layout])
    if pixel_size is not None:
        preprocessing["pixel_size"] = [float(v) for v in pixel_size]
    if spatial_size is not None:
        preprocessing["spatial_size"] = [int(v) for v in spatial_size]
    name = str(name)  # fire turns `--name 2024` into an int
    target = Path(str(output)) if output else REPO_ROOT / "data_manifests" / f"{name}.json"
    result = make_manifest(layout, str(dataset_dir), target, name=name, counts=counts,
                           preprocessing=preprocessing, **options)
    sizes = ", ".join(f"{split_name} {len(result.manifest[split_name])}" for split_name in SPLITS)
    lines = [f"{target}: {result.num_volumes()} volumes ({sizes})"]
    if result.report() is not None:
        lines.append(f"{len(result.skipped)} case(s) skipped, {len(result.warnings)} warning(s): "
                     f"see {target.with_name(target.stem + '.report.json')}")
    return "\n".join(lines)


def acdc(dataset_dir: str, name: str = "acdc", output: str | None = None, skip_bad: bool = True,
         test: int | None = None, val: int | None = None, train: int | None = None,
         pretrain: int | None = None, seed: int = SPLIT_SEED, pixel_size: list[float] | None = None,
         spatial_size: list[int] | None = None) -> str:
    """ACDC: ``patientNNN/`` folders with ``Info.cfg``; two volumes (ED, ES) per patient."""
    split = {"test": test, "val": val, "train": train, "pretrain": pretrain}
    return _run("acdc", dataset_dir, name, output, split, pixel_size, spatial_size, seed=seed, skip_bad=skip_bad)


def msd(dataset_dir: str, name: str = "hippocampus", output: str | None = None, skip_bad: bool = True,
        test: int | None = None, val: int | None = None, train: int | None = None,
        pretrain: int | None = None, seed: int = SPLIT_SEED, pixel_size: list[float] | None = None,
        spatial_size: list[int] | None = None) -> str:
    """MSD task folder: ``imagesTr/`` + ``labelsTr/``; labels from ``dataset.json`` or hippocampus."""
    split = {"test": test, "val": val, "train": train, "pretrain": pretrain}
    return _run("msd", dataset_dir, name, output, split, pixel_size, spatial_size, seed=seed, skip_bad=skip_bad)


def dicom(dataset_dir: str, name: str = "dicom_pgbm", output: str | None = None, skip_bad: bool = True,
          image_series: str = "FLAIRreg", mask_series: str = "MaskTumor", salt: str | None = None,
          test: int | None = None, val: int | None = None, train: int | None = None,
          pretrain: int | None = None, seed: int = SPLIT_SEED, pixel_size: list[float] | None = None,
          spatial_size: list[int] | None = None) -> str:
    """Folder of ``<patient>/<image_series>/`` + ``<patient>/<mask_series>/`` DICOM series.

    Patient ids are pseudonymised with ``salt`` (else ``$METACONTRAST_PSEUDONYM_SALT``, else the
    dataset name, with a warning).
    """
    split = {"test": test, "val": val, "train": train, "pretrain": pretrain}
    return _run("dicom", dataset_dir, name, output, split, pixel_size, spatial_size, seed=seed,
                skip_bad=skip_bad, image_series=str(image_series), mask_series=str(mask_series),
                salt=None if salt is None else str(salt))


def main() -> None:
    """Entry point: log warnings and progress to stderr, dispatch with ``fire``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fire.Fire({"acdc": acdc, "msd": msd, "dicom": dicom})


if __name__ == "__main__":
    main()
