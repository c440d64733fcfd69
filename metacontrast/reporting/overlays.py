"""Prediction overlays: a few test slices, one row each: image, ground truth, and the prediction an evaluate
run saved (``predictions/<volume_id>.nii.gz``), labels drawn over the image (``overlays_<method>.png``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..layout import RunLayout
from .figures import TILE_PX, figure, pyplot

__all__ = ["choose_overlay_slices", "plot_overlays", "predictions_dir"]


def choose_overlay_slices(labels: Mapping[str, np.ndarray], count: int) -> list[tuple[str, int]]:
    """``count`` (volume_id, slice index) pairs with ground-truth foreground, spread over the volumes.

    ``labels[volume_id]`` is an (X, Y, Z) label map.  The volumes are taken in the given order, one slice
    each, then more from each in turn; a volume's slices are evenly spaced over its foreground slices.
    """
    foreground = {vid: np.flatnonzero(label.reshape(-1, label.shape[-1]).any(axis=0)) for vid, label in labels.items()}
    foreground = {vid: z for vid, z in foreground.items() if z.size}
    if not foreground:
        raise LookupError("no ground-truth foreground in any volume: nothing to overlay")
    vids = list(foreground)
    per_volume = [count // len(vids) + (k < count % len(vids)) for k in range(len(vids))]
    chosen = []
    for vid, n in zip(vids, per_volume):
        if n:
            z = foreground[vid]
            picks = np.unique(z[np.linspace(0, z.size - 1, n + 2)[1:-1].round().astype(int)])
            chosen += [(vid, int(k)) for k in picks]
    return chosen


def plot_overlays(tiles: Sequence[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]], class_names: Mapping[int, str],
                  path: str | os.PathLike[str], title: str) -> Path:
    """Rows of (image, ground truth, prediction) tiles; ``tiles`` = (volume_id, z, image, label, pred) 2D slices."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap  # heavy, as in figures.pyplot: loaded to draw only
    from matplotlib.patches import Patch

    classes = sorted(k for k in class_names if k > 0)
    colours = [plt.cm.tab10(k % 10) for k in range(max(classes, default=0) + 1)]
    cmap = ListedColormap(colours)
    with figure(len(tiles), 3, (TILE_PX, TILE_PX), path) as (fig, axes):
        for row, (vid, z, image, label, pred) in enumerate(tiles):
            lo, hi = np.percentile(image, [1, 99])
            for col, (overlay, name) in enumerate(((None, "image"), (label, "ground truth"), (pred, "prediction"))):
                ax = axes[row, col]
                ax.imshow(np.rot90(image), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
                if overlay is not None:
                    shown = np.ma.masked_equal(np.rot90(overlay).astype(int), 0)
                    ax.imshow(shown, cmap=cmap, vmin=0, vmax=len(colours) - 1, alpha=0.5, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(name, fontsize="small")
                if col == 0:
                    ax.set_ylabel(f"{vid} z={z}", fontsize="x-small")
        fig.legend(handles=[Patch(color=colours[k], alpha=0.5, label=class_names[k]) for k in classes],
                   loc="lower center", ncol=max(len(classes), 1), fontsize="x-small", frameon=False)  # fmt: skip
        fig.suptitle(title, fontsize="small")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    return Path(path)

def predictions_dir(run: Any, runs_dir: Path, dataset: str) -> Path:
    """Where the evaluate ``run`` wrote its NIfTI predictions (see the module docstring)."""
    tags, params = run.data.tags, run.data.params
    candidates = []
    if params.get("ckpt"):
        candidates.append(RunLayout.evaluation_dir(Path(params["ckpt"]).parent) / "predictions")
    finetune_dir = RunLayout(runs_dir, dataset).finetune_dir(tags.get("method", "?"), tags.get("num_labeled"), tags.get("seed"))
    candidates.append(RunLayout.evaluation_dir(finetune_dir) / "predictions")
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"the predictions of evaluate run {run.info.run_id} ({run.info.run_name}) are not in {' nor '.join(map(str, candidates))}"
    )
