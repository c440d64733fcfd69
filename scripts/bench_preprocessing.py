"""Benchmark: preprocess and cache every ACDC volume as 2D slices, then reload the cache.

Prints, per preset, the wall time of a cold build (preprocess + stack + write the disk cache), the
time of a reload from the disk cache, the number of volumes and slices, the in-memory size of the
cached slice set and the peak resident memory. Targets (issue 3): under one minute, under 2 GB.

    python scripts/bench_preprocessing.py --dataset_dir /path/to/acdc/training \\
        --output results/benchmarks/preprocessing_cpu.txt

The datalist is ``--datalist`` (default ``data_manifests/acdc.json``; every split is used), or, when
that file is absent, every ``patientNNN/patientNNN_frameXX.nii.gz`` under ``dataset_dir`` with ED/ES
read from ``Info.cfg``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fire
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as `python scripts/bench_preprocessing.py` without install
    sys.path.insert(0, str(REPO_ROOT))

from metacontrast.data.slices import build_slice_cache  # noqa: E402

PRESETS: dict[str, tuple[tuple[float, float], tuple[int, int]]] = {
    "full": ((1.367, 1.367), (192, 192)),  # paper scale (DESIGN.md section 4)
    "cpu": ((2.734, 2.734), (96, 96)),  # CPU-scale preset (issue 10)
}
SPLITS = ("pretrain", "train", "val", "test")


def _manifest_datalist(path: Path) -> list[dict[str, Any]]:
    manifest = json.loads(path.read_text())
    return [entry for split in SPLITS for entry in manifest.get(split, [])]


def _globbed_acdc_datalist(dataset_dir: Path) -> list[dict[str, Any]]:
    """Every ED/ES frame of ``patientNNN/`` folders (the ``Info.cfg`` frame numbers)."""
    entries = []
    for folder in sorted(p for p in dataset_dir.glob("patient[0-9][0-9][0-9]") if p.is_dir()):
        info = dict(re.findall(r"^(\w+):\s*(\S+)", (folder / "Info.cfg").read_text(), flags=re.M))
        for state in ("ED", "ES"):
            stem = f"{folder.name}/{folder.name}_frame{int(info[state]):02d}"
            entries.append(
                {
                    "image": f"{stem}.nii.gz",
                    "label": f"{stem}_gt.nii.gz",
                    "volume_id": f"{folder.name}_{state}",
                    "patient_id": folder.name,
                    "organ_state": state,
                }
            )
    return entries


def _peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of this process and of its finished children (the loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def bench(
    dataset_dir: str,
    datalist: str = str(REPO_ROOT / "data_manifests" / "acdc.json"),
    presets: str | tuple[str, ...] = ("full", "cpu"),
    cache_dir: str | None = None,
    num_workers: int | None = None,
    threads: int = 2,
    output: str | None = None,
) -> None:
    """Build (cold) and reload the ACDC slice cache for each preset; print and optionally save the report.

    Args:
        dataset_dir: the ACDC ``training`` folder.
        datalist: manifest JSON; if it does not exist the folder is globbed.
        presets: names from ``PRESETS`` (``full``: 1.367 mm, 192x192; ``cpu``: 2.734 mm, 96x96).
        cache_dir: where the disk cache goes; default a fresh temporary folder (so the build is cold).
        num_workers: preprocessing worker processes (``None``: the library default).
        threads: ``torch.set_num_threads`` for this process.
        output: also write the report to this file.
    """
    torch.set_num_threads(threads)
    root = Path(dataset_dir)
    manifest = Path(datalist)
    entries = _manifest_datalist(manifest) if manifest.is_file() else _globbed_acdc_datalist(root)
    source = str(manifest.relative_to(REPO_ROOT) if manifest.is_relative_to(REPO_ROOT) else manifest) if manifest.is_file() else "glob"
    with_labels = all(e.get("label") for e in entries)
    lines = [
        f"# bench_preprocessing: {len(entries)} ACDC volumes (datalist: {source}), labels: {with_labels}",
        f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {threads}, "
        f"load average at start {os.getloadavg()[0]:.1f} (other processes share these cores)",
    ]
    print("\n".join(lines), flush=True)
    for name in (presets,) if isinstance(presets, str) else presets:
        pixel_size, spatial_size = PRESETS[name]
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(cache_dir) / name if cache_dir else Path(tmp)
            kwargs = dict(
                datalist=entries, dataset_dir=root, pixel_size=pixel_size, spatial_size=spatial_size,
                with_labels=with_labels, cache_dir=where, progress=False, num_workers=num_workers,
            )  # fmt: skip
            start = time.perf_counter()
            cache = build_slice_cache(**kwargs)
            built = time.perf_counter() - start
            start = time.perf_counter()
            reloaded = build_slice_cache(**kwargs)
            reload = time.perf_counter() - start
            assert torch.equal(cache.images, reloaded.images), "reloaded cache differs from the built one"
            disk = sum(f.stat().st_size for f in where.glob("slices-*.pt"))
        own, children = _peak_rss_mb()
        line = (
            f"{name:>4}: pixel {pixel_size[0]} mm, {spatial_size[0]}x{spatial_size[1]}: "
            f"preprocess+cache {built:.1f} s, reload {reload:.2f} s, {cache.num_volumes} volumes, "
            f"{len(cache)} slices, in memory {cache.nbytes / 2**20:.0f} MiB, on disk {disk / 2**20:.0f} MiB, "
            f"peak RSS {own:.0f} MiB (workers {children:.0f} MiB)"
        )
        print(line, flush=True)
        lines.append(line)
        del cache, reloaded
    report = "\n".join(lines) + "\n"
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(report)


if __name__ == "__main__":
    fire.Fire(bench)
