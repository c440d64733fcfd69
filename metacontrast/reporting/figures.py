"""What every figure of the reports shares: a pixel-exact PNG of fixed-size panels, drawn with matplotlib (Agg).

Every panel has a fixed size in pixels (:data:`PANEL_PX`, :data:`TILE_PX`), so a figure's size says how many
panels it holds; no time stamp is written, so redrawing the same runs gives the same bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write

__all__ = ["DPI", "MAX_COLUMNS", "PANEL_PX", "TILE_PX", "figure", "grid_shape", "pyplot"]

DPI = 100
#: (width, height) in pixels of one curve or t-SNE panel
PANEL_PX = (360, 300)
#: side in pixels of one overlay tile
TILE_PX = 220
#: at most this many curve panels side by side
MAX_COLUMNS = 3


def pyplot() -> Any:
    """matplotlib's ``pyplot`` on the Agg backend."""
    import matplotlib  # heavy and only needed to draw: loaded when the first figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def figure(rows: int, cols: int, panel_px: tuple[int, int], path: str | os.PathLike[str]) -> Iterator[tuple[Any, np.ndarray]]:
    """A figure of ``rows x cols`` panels of ``panel_px`` pixels each, saved to ``path`` as PNG on exit.

    The PNG is exactly ``(cols * panel_px[0], rows * panel_px[1])`` pixels; no time stamp is written.
    """
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_px[0] / DPI, rows * panel_px[1] / DPI), dpi=DPI, squeeze=False)
    try:
        yield fig, axes
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        plt.close(fig)


def grid_shape(panels: int) -> tuple[int, int]:
    """(rows, columns) of a figure of ``panels`` panels, at most :data:`MAX_COLUMNS` side by side."""
    cols = min(panels, MAX_COLUMNS)
    return math.ceil(panels / cols), cols
