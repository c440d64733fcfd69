#!/usr/bin/env python3
"""Merge a device run's returned files into the grid's MLflow store: see ``docs/device.md``.

    python scripts/import_device_run.py --returned /work/.device/<call> --runs_dir runs_paper_scale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metacontrast.device.importer import import_device_run  # noqa: E402


def main(returned: str, runs_dir: str = "runs_paper_scale") -> None:
    result = import_device_run(returned, runs_dir)
    print(json.dumps(result["stores"], indent=2))
    print(f"{len(result['unpacked'])} files unpacked under {runs_dir}")


if __name__ == "__main__":
    fire.Fire(main)
