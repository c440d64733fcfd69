"""Per-volume 3D segmentation metrics (Dice, HD95, ASD in millimetres), their summary, and files.

The numbers come from :mod:`monai.metrics` (``compute_dice``, ``compute_hausdorff_distance`` with
``percentile=95``, ``compute_average_surface_distance`` with ``symmetric=True``), computed on the
original voxel grid with ``spacing=`` the volume's physical voxel size, so distances are in mm.
What MONAI leaves open is how empty masks are scored and counted; this module fixes it:

Conventions (per volume, per foreground class ``c``; label = ground truth, pred = prediction)

====================  =========  ============  ==================  ===========================
label / pred          Dice       HD95, ASD     ``status_<c>``      summary counter
====================  =========  ============  ==================  ===========================
present / present     computed   computed      ``ok``              (in the means)
present / empty       **0**      **NaN**       ``empty_pred``      ``n_empty_pred``
absent / present      **0**      **NaN**       ``false_positive``  ``n_false_positive``
absent / absent       **NaN**    **NaN**       ``absent``          ``n_absent``
====================  =========  ============  ==================  ===========================

* A missed class is never silently dropped: its Dice of 0 enters every Dice mean, and the
  undefined surface distances (MONAI returns ``inf``; we store ``NaN`` so CSV, JSON and MLflow
  all hold it) are excluded from the distance means but *counted* beside them (``n`` = values
  averaged, ``n_empty_pred`` = classes missed).  A surface distance to nothing has no finite
  value, and a penalty constant (the image diagonal, say) would be a number we made up.
* A class absent from both label and prediction has no Dice (0/0): it is ``NaN``, left out of
  the means and counted as ``n_absent``.
* HD95 is MONAI's symmetric percentile Hausdorff distance: the larger of the two directed 95th
  percentiles of surface-voxel distances.  ASD is MONAI's symmetric average surface distance:
  the mean over the union of both directed distance sets (surface voxels from binary erosion).
* Per volume, ``dice_mean`` / ``hd95_mean`` / ``asd_mean`` average the classes whose value is
  defined (not ``NaN``).  The summary gives mean and *population* std (``ddof=0``; defined for a
  single volume) over volumes, per class and for the per-volume means, with the count ``n``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice

from ..io import atomic_write
from monai.metrics.hausdorff_distance import _compute_percentile_hausdorff_distance
from monai.metrics.utils import get_edge_surface_distance
from monai.networks.utils import one_hot

__all__ = [
    "METRICS",
    "class_key",
    "flatten_summary",
    "summarise",
    "volume_metrics",
    "write_metrics_csv",
    "write_summary",
]

#: The metric names, in column order.  HD95 and ASD are in millimetres.
METRICS: tuple[str, ...] = ("dice", "hd95", "asd")

STATUS_OK = "ok"
STATUS_EMPTY_PRED = "empty_pred"
STATUS_FALSE_POSITIVE = "false_positive"
STATUS_ABSENT = "absent"
_COUNTERS = {
    STATUS_EMPTY_PRED: "n_empty_pred",
    STATUS_FALSE_POSITIVE: "n_false_positive",
    STATUS_ABSENT: "n_absent",
}


def class_key(name: str) -> str:
    """A class name as it appears in column and MLflow metric names (``[A-Za-z0-9_.-]`` only)."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name).strip())
    return key or "class"


def _foreground_classes(class_names: Mapping[int, str] | Mapping[str, str]) -> dict[int, str]:
    """``{index: key}`` for the foreground classes (index 0, the background, is dropped)."""
    classes = {int(index): class_key(name) for index, name in class_names.items() if int(index) != 0}
    if not classes:
        raise ValueError(f"class_names has no foreground class: {dict(class_names)}")
    if len(set(classes.values())) != len(classes):
        raise ValueError(f"class names collide after sanitising: {classes}")
    return dict(sorted(classes.items()))


def _as_one_hot(mask: torch.Tensor | np.ndarray, num_classes: int, spatial_ndim: int, what: str) -> torch.Tensor:
    """``(1, C, *spatial)`` boolean one-hot on the CPU from a one-hot ``(C, *spatial)`` or a label map.

    A label map may be ``(*spatial)`` or ``(1, *spatial)``.  Metrics run on the CPU on purpose:
    MONAI's CPU path (KD-tree over the surface voxels) is exact and needs no cuCIM.
    """
    tensor = torch.as_tensor(mask).detach().cpu()
    if tensor.ndim == spatial_ndim:
        tensor = tensor[None]
    if tensor.ndim != spatial_ndim + 1:
        raise ValueError(
            f"{what} must be (C, *spatial) or (*spatial) with {spatial_ndim} spatial dims, got {tuple(tensor.shape)}"
        )
    if tensor.shape[0] == 1 and num_classes > 1:
        tensor = one_hot(tensor[None].long(), num_classes=num_classes, dim=1)[0]
    elif tensor.shape[0] != num_classes:
        raise ValueError(f"{what} has {tensor.shape[0]} channels, expected 1 (label map) or {num_classes} (one-hot)")
    return tensor[None].bool()


def _nan_if_inf(value: float) -> float:
    return value if math.isfinite(value) else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def volume_metrics(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    class_names: Mapping[int, str] | Mapping[str, str],
    volume_id: str = "",
) -> dict[str, Any]:
    """Dice, HD95 (mm) and ASD (mm) of one volume, per foreground class, following the module's conventions.

    Args:
        pred: prediction on the original voxel grid, one-hot ``(C, *spatial)`` (binarised) or a
            label map ``(*spatial)`` / ``(1, *spatial)``.
        label: ground truth, in the same forms and grid as ``pred``.
        spacing: physical voxel size along each spatial axis, in mm (e.g. the manifest's ``spacing``).
        class_names: ``{index: name}``, background (0) optional and ignored; ``C = max(index) + 1``.
        volume_id: stored in the row as ``volume_id``.

    Returns:
        One flat row: ``volume_id``; per class ``dice_<c>``, ``hd95_<c>``, ``asd_<c>``,
        ``status_<c>``; then ``dice_mean``, ``hd95_mean``, ``asd_mean`` and ``n_empty_pred``.
    """
    classes = _foreground_classes(class_names)
    num_classes = max(classes) + 1
    spacing = [float(s) for s in spacing]
    y_pred = _as_one_hot(pred, num_classes, len(spacing), "pred")
    y = _as_one_hot(label, num_classes, len(spacing), "label")
    if y_pred.shape != y.shape:
        raise ValueError(f"pred {tuple(y_pred.shape)} and label {tuple(y.shape)} are not on the same grid")

    index = list(classes)
    y_pred, y = y_pred[:, index], y[:, index]  # only the foreground classes, in order
    dice = compute_dice(y_pred.float(), y.float(), include_background=True, ignore_empty=False)[0]
    pred_any = y_pred.flatten(2).any(-1)[0]
    label_any = y.flatten(2).any(-1)[0]
    both = pred_any & label_any
    hd95 = torch.full((len(index),), float("nan"))
    asd = torch.full((len(index),), float("nan"))
    for i in both.nonzero()[:, 0].tolist():  # MONAI warns and returns inf for empty masks; only ask where both are present
        hd95[i], asd[i] = _surface_distances(y_pred[0, i], y[0, i], spacing)

    row: dict[str, Any] = {"volume_id": volume_id}
    per_metric: dict[str, list[float]] = {m: [] for m in METRICS}
    n_empty = 0
    for i, key in enumerate(classes.values()):
        has_pred, has_label = bool(pred_any[i]), bool(label_any[i])
        if has_pred and has_label:
            status, d = STATUS_OK, float(dice[i])
        elif has_label:
            status, d = STATUS_EMPTY_PRED, 0.0
            n_empty += 1
        elif has_pred:
            status, d = STATUS_FALSE_POSITIVE, 0.0
        else:
            status, d = STATUS_ABSENT, float("nan")
        values = {"dice": d, "hd95": _nan_if_inf(float(hd95[i])), "asd": _nan_if_inf(float(asd[i]))}
        for metric, value in values.items():
            row[f"{metric}_{key}"] = value
            per_metric[metric].append(value)
        row[f"status_{key}"] = status
    for metric in METRICS:
        row[f"{metric}_mean"] = _nanmean(per_metric[metric])
    row["n_empty_pred"] = n_empty
    return row


def _surface_distances(pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float]) -> tuple[float, float]:
    """HD95 and symmetric ASD (mm) of one class from ONE edge-distance computation.

    Exactly what ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_average_surface_distance(symmetric=True)`` return, but MONAI's two functions each
    compute the edges and the KD-tree distances again; this does it once (half the evaluation time).
    """
    _, distances, _ = get_edge_surface_distance(pred.float(), label.float(), spacing=list(spacing), symmetric=True)
    hd95 = max(float(_compute_percentile_hausdorff_distance(d, 95)) for d in distances)
    return hd95, float(torch.cat(distances).mean())


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, population std and count of the defined (non-NaN) values."""
    defined = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if defined.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(defined.mean()), "std": float(defined.std()), "n": int(defined.size)}


def _class_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [column[len("status_") :] for column in rows[0] if column.startswith("status_")]


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std over volumes, per class and of the per-volume means, with the counts of empty masks.

    Returns ``{"n_volumes", "classes": {c: {"dice"|"hd95"|"asd": {"mean", "std", "n"},
    "n_empty_pred", "n_false_positive", "n_absent"}}, "mean": {"dice"|"hd95"|"asd": {...}},
    "n_empty_pred", "n_false_positive", "volumes_with_empty_pred": [volume_id, ...]}``.
    """
    if not rows:
        raise ValueError("no rows to summarise")
    classes: dict[str, Any] = {}
    for key in _class_keys(rows):
        entry: dict[str, Any] = {m: _stats([float(r[f"{m}_{key}"]) for r in rows]) for m in METRICS}
        for status, counter in _COUNTERS.items():
            entry[counter] = sum(r[f"status_{key}"] == status for r in rows)
        classes[key] = entry
    return {
        "n_volumes": len(rows),
        "classes": classes,
        "mean": {m: _stats([float(r[f"{m}_mean"]) for r in rows]) for m in METRICS},
        "n_empty_pred": sum(c["n_empty_pred"] for c in classes.values()),
        "n_false_positive": sum(c["n_false_positive"] for c in classes.values()),
        "volumes_with_empty_pred": [r["volume_id"] for r in rows if r["n_empty_pred"]],
    }


def flatten_summary(summary: Mapping[str, Any], prefix: str = "test") -> dict[str, float]:
    """The summary as MLflow metrics: ``<prefix>_dice_mean``, ``<prefix>_dice_std``, ``<prefix>_hd95_mean``, ...,
    ``<prefix>_dice_<class>``, ``<prefix>_dice_<class>_std``, ``<prefix>_n_empty_pred[_<class>]``."""
    out: dict[str, float] = {}
    for metric in METRICS:
        out[f"{prefix}_{metric}_mean"] = summary["mean"][metric]["mean"]
        out[f"{prefix}_{metric}_std"] = summary["mean"][metric]["std"]
        for key, entry in summary["classes"].items():
            out[f"{prefix}_{metric}_{key}"] = entry[metric]["mean"]
            out[f"{prefix}_{metric}_{key}_std"] = entry[metric]["std"]
    for key, entry in summary["classes"].items():
        out[f"{prefix}_n_empty_pred_{key}"] = float(entry["n_empty_pred"])
    out[f"{prefix}_n_empty_pred"] = float(summary["n_empty_pred"])
    out[f"{prefix}_n_false_positive"] = float(summary["n_false_positive"])
    out[f"{prefix}_n_volumes"] = float(summary["n_volumes"])
    return out



def write_metrics_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write one row per volume (columns as :func:`volume_metrics` orders them; NaN written as ``nan``)."""
    if not rows:
        raise ValueError("no rows to write")
    columns = list(rows[0])
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def _json_safe(value: Any) -> Any:
    """NaN/inf become ``null`` so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the summary as strict JSON (sorted keys, indent 2; undefined values as ``null``)."""
    with atomic_write(path) as handle:
        json.dump(_json_safe(summary), handle, indent=2, sort_keys=True, allow_nan=False)
        handle.write("\n")
    return Path(path)
