"""Pictures of a results grid from its MLflow runs: training curves, Dice against L, t-SNE of the encoder, overlays.

    python scripts/draw_pictures.py --dataset acdc --dataset_dir /data/ACDC/training \
        --tracking_uri sqlite:///runs/acdc/mlruns.db --out_dir results/acdc/figures

Writes PNG files (see ``metacontrast/reporting/pictures.py``); a figure that cannot be drawn is named with
what is missing, and the command then exits with status 1 after drawing the others.
"""

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from metacontrast.reporting.pictures import draw_pictures  # noqa: E402


@functools.wraps(draw_pictures)
def main(*args, **kwargs) -> None:
    pictures = draw_pictures(*args, **kwargs)
    print(f"[pictures] {len(pictures.figures)} figures written; {len(pictures.missing)} not drawn")
    for message in pictures.missing:
        print(f"[pictures] missing: {message}")
    if pictures.missing:
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
