#!/usr/bin/env python3
"""Write what a device run carries into a git-ignored folder (default ``device_data/``): see ``docs/device.md``.

    python scripts/pack_device.py --dataset acdc --dataset_dir /data/ACDC/training            # paper scale
    python scripts/pack_device.py --dataset acdc --dataset_dir /data/ACDC/training --preset cpu

writes ``<out>/<dataset>_pack/`` (a slice pack of the manifest's ``pretrain``, ``train``, ``val`` and ``test`` splits at
the manifest's preprocessing, or the preset's, with the source labels of ``--scored_splits`` so that ``evaluate``
scores them there), ``<out>/site.tar.xz`` (the packages the GPU host lacks, for its Python
``--python_version``; kept if present, ``--site False`` skips it) and ``<out>/manifest.json`` (sizes and sha256).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metacontrast import REPO_ROOT  # noqa: E402
from metacontrast.device.packer import build_site, pack_dataset, write_manifest  # noqa: E402
from metacontrast.workflows.data import preprocessing_settings, read_manifest  # noqa: E402


def main(dataset: str, dataset_dir: str, out: str = "device_data", preset: str | None = None,
         splits: tuple[str, ...] = ("pretrain", "train", "val", "test"), scored_splits: tuple[str, ...] = ("test",),
         site: bool = True, python_version: str = "3.12") -> None:
    manifest_path = REPO_ROOT / "data_manifests" / f"{dataset}.json"
    overrides = json.loads((REPO_ROOT / "bundles/common/configs/presets" / f"{preset}.json").read_text())["preprocessing_overrides"] if preset else {}
    settings = preprocessing_settings(read_manifest(manifest_path), overrides, dataset)
    root = Path(out)
    pack = pack_dataset(manifest_path, dataset_dir, root / f"{dataset}_pack", dataset, settings["pixel_size"], settings["spatial_size"], list(splits),
                        scored_splits=list(scored_splits))
    print(f"slice pack: {pack} ({settings})")
    if site and not (root / "site.tar.xz").is_file():
        print(f"packages: {build_site(root / 'site.tar.xz', python_version)}")
    record = write_manifest(root, " ".join(sys.argv))
    print(f"{root}: {record['total_bytes'] / 2**20:.1f} MiB in {len(record['files'])} files")


if __name__ == "__main__":
    fire.Fire(main)
