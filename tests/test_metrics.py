"""3D Dice / HD95 / ASD against shapes whose answers are known in closed form (anisotropic spacing)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from metacontrast.workflows.metrics import (
    flatten_summary,
    summarise,
    volume_metrics,
    write_metrics_csv,
    write_summary,
)

SPACING = (1.5, 0.7, 3.0)  # mm, deliberately different on every axis
ONE_CLASS = {0: "background", 1: "fg"}


Idx3 = tuple[int, int, int]


def box(shape: Idx3, lo: Idx3, hi: Idx3, value: int = 1) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.long)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return out


def test_dice_of_offset_boxes_is_exact() -> None:
    a = box((24, 20, 16), (2, 3, 1), (12, 15, 9))  # 10 x 12 x 8
    b = box((24, 20, 16), (5, 1, 4), (19, 11, 12))  # 14 x 10 x 8
    overlap = (12 - 5) * (11 - 3) * (9 - 4)
    expected = 2 * overlap / (10 * 12 * 8 + 14 * 10 * 8)
    row = volume_metrics(b, a, SPACING, ONE_CLASS, "v")
    assert row["dice_fg"] == pytest.approx(expected, rel=1e-6)
    assert row["status_fg"] == "ok"


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 3])
def test_hd95_of_shifted_cubes_is_shift_times_spacing(axis: int, shift: int) -> None:
    """Two 8^3 cubes offset by ``shift`` voxels along ``axis``: every voxel of the trailing face is
    exactly ``shift * spacing[axis]`` from the other surface and none is farther; that face is over
    5 % of the surface, so the 95th percentile (and the maximum) is ``shift * spacing[axis]``."""
    n, lo = 8, [3, 3, 3]
    shifted = list(lo)
    shifted[axis] += shift
    label = box((16, 16, 16), tuple(lo), tuple(x + n for x in lo))
    pred = box((16, 16, 16), tuple(shifted), tuple(x + n for x in shifted))
    row = volume_metrics(pred, label, SPACING, ONE_CLASS)
    assert row["hd95_fg"] == pytest.approx(shift * SPACING[axis], rel=1e-6)
    assert row["dice_fg"] == pytest.approx((n - shift) / n, rel=1e-6)


@pytest.mark.parametrize(("rows", "hd95_is_corner"), [(10, True), (25, False)])
def test_asd_and_hd95_of_offset_plates(rows: int, hd95_is_corner: bool) -> None:
    """Two one-voxel-thick plates (every voxel is surface), ``k`` voxels apart along axis 0 and
    shifted by one row along axis 1.  All but one row per plate is ``d0 = k*s0`` from the other
    plate; the unmatched row is ``d1 = sqrt(d0^2 + s1^2)``.  So ASD = ((rows-1) d0 + d1) / rows, and
    HD95 = d1 when the unmatched row is over 5 % of the surface (10 rows) and d0 when it is under
    (25 rows), while the plain Hausdorff distance would be d1 in both cases."""
    k, depth = 3, 4
    label = box((12, rows + 4, depth + 2), (2, 1, 1), (3, 1 + rows, 1 + depth))
    pred = box((12, rows + 4, depth + 2), (2 + k, 2, 1), (3 + k, 2 + rows, 1 + depth))
    d0 = k * SPACING[0]
    d1 = math.hypot(d0, SPACING[1])
    row = volume_metrics(pred, label, SPACING, ONE_CLASS)
    assert row["asd_fg"] == pytest.approx(((rows - 1) * d0 + d1) / rows, rel=1e-5)
    assert row["hd95_fg"] == pytest.approx(d1 if hd95_is_corner else d0, rel=1e-5)
    assert row["dice_fg"] == 0.0


def test_asd_is_symmetric_over_both_surfaces() -> None:
    """Prediction plate ``extra`` rows longer than the label plate, ``k`` voxels away along axis 0.
    Label -> prediction: all ``n`` rows at ``d0``; prediction -> label: ``n`` rows at ``d0`` and
    row ``j`` past the end at ``sqrt(d0^2 + (j*s1)^2)``.  The symmetric ASD averages all of them."""
    k, n, extra, depth = 2, 10, 3, 4
    label = box((10, n + extra + 2, depth + 2), (1, 1, 1), (2, 1 + n, 1 + depth))
    pred = box((10, n + extra + 2, depth + 2), (1 + k, 1, 1), (2 + k, 1 + n + extra, 1 + depth))
    d0 = k * SPACING[0]
    tail = [math.hypot(d0, j * SPACING[1]) for j in range(1, extra + 1)]
    row = volume_metrics(pred, label, SPACING, ONE_CLASS)
    assert row["asd_fg"] == pytest.approx((2 * n * d0 + sum(tail)) / (2 * n + extra), rel=1e-5)
    assert row["hd95_fg"] == pytest.approx(tail[-1], rel=1e-5)  # top 3 of 13 rows: the 95th percentile is the last


def test_background_only_prediction_scores_zero_and_is_counted() -> None:
    names = {0: "background", 1: "RV", 2: "Myo", 3: "LV"}
    label = box((16, 16, 8), (2, 2, 1), (8, 8, 6), 1) + box((16, 16, 8), (9, 9, 1), (14, 14, 6), 3)
    pred = torch.zeros_like(label)
    row = volume_metrics(pred, label, SPACING, names, "empty")
    assert row["dice_RV"] == 0.0 and row["dice_LV"] == 0.0
    assert math.isnan(row["hd95_RV"]) and math.isnan(row["asd_LV"])
    assert row["status_RV"] == row["status_LV"] == "empty_pred"
    assert row["status_Myo"] == "absent" and math.isnan(row["dice_Myo"])  # absent in both: no Dice
    assert row["dice_mean"] == 0.0  # the misses count; the absent class does not
    assert row["n_empty_pred"] == 2

    good = volume_metrics(label, label, SPACING, names, "perfect")
    summary = summarise([row, good])
    assert summary["n_empty_pred"] == 2
    assert summary["classes"]["RV"]["n_empty_pred"] == 1
    assert summary["classes"]["Myo"]["n_absent"] == 2
    assert summary["volumes_with_empty_pred"] == ["empty"]
    assert summary["classes"]["RV"]["dice"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert summary["classes"]["RV"]["hd95"] == {"mean": 0.0, "std": 0.0, "n": 1}  # NaN left out, counted
    assert summary["mean"]["dice"]["mean"] == pytest.approx(0.5)
    flat = flatten_summary(summary)
    assert flat["test_dice_mean"] == pytest.approx(0.5) and flat["test_n_empty_pred"] == 2.0
    assert flat["test_n_empty_pred_RV"] == 1.0 and flat["test_hd95_mean"] == 0.0


def test_false_positive_class_scores_zero() -> None:
    label = box((10, 10, 6), (1, 1, 1), (5, 5, 4))
    pred = label + box((10, 10, 6), (6, 6, 1), (9, 9, 4), 2)  # class 2 predicted, not in the label
    row = volume_metrics(pred, label, SPACING, {1: "a", 2: "b"})
    assert row["status_b"] == "false_positive" and row["dice_b"] == 0.0 and math.isnan(row["hd95_b"])
    assert row["dice_a"] == pytest.approx(1.0) and row["hd95_a"] == 0.0
    assert summarise([row])["n_false_positive"] == 1


def test_one_hot_and_label_map_inputs_agree() -> None:
    label = box((12, 12, 6), (1, 1, 1), (7, 9, 5), 1) + box((12, 12, 6), (8, 2, 1), (11, 10, 5), 2)
    pred = box((12, 12, 6), (2, 1, 1), (7, 10, 5), 1) + box((12, 12, 6), (8, 3, 2), (11, 10, 5), 2)
    names = {0: "bg", 1: "a", 2: "b"}
    from_maps = volume_metrics(pred, label, SPACING, names)
    one_hot = lambda x: torch.nn.functional.one_hot(x, 3).permute(3, 0, 1, 2)  # noqa: E731
    from_one_hot = volume_metrics(one_hot(pred), one_hot(label)[None][0], SPACING, names)
    from_channel = volume_metrics(pred[None].numpy(), label[None], SPACING, names)
    assert from_maps == from_one_hot == from_channel


def test_mismatched_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="same grid"):
        pred, label = torch.zeros(8, 8, 4, dtype=torch.long), torch.zeros(8, 8, 5, dtype=torch.long)
        volume_metrics(pred, label, SPACING, ONE_CLASS)
    with pytest.raises(ValueError, match="channels"):
        volume_metrics(torch.zeros(5, 8, 8, 4), torch.zeros(5, 8, 8, 4), SPACING, ONE_CLASS)


def test_files_round_trip(tmp_path) -> None:
    label = box((10, 10, 6), (1, 1, 1), (6, 6, 4))
    rows = [
        volume_metrics(label, label, SPACING, ONE_CLASS, "same"),
        volume_metrics(torch.zeros_like(label), label, SPACING, ONE_CLASS, "missed"),
    ]
    csv_path = write_metrics_csv(rows, tmp_path / "out" / "metrics.csv")
    with open(csv_path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [r["volume_id"] for r in read] == ["same", "missed"]
    assert float(read[0]["dice_fg"]) == pytest.approx(1.0) and read[1]["hd95_fg"] == "nan"
    assert read[1]["status_fg"] == "empty_pred"

    summary = summarise(rows)
    json_path = write_summary(summary, tmp_path / "out" / "summary.json")
    loaded = json.loads(json_path.read_text())  # strict JSON: NaN written as null
    assert loaded["classes"]["fg"]["hd95"]["n"] == 1 and loaded["n_empty_pred"] == 1
    assert loaded["classes"]["fg"]["dice"]["mean"] == pytest.approx(0.5)
    assert loaded["classes"]["fg"]["dice"]["std"] == pytest.approx(float(np.std([1.0, 0.0])))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.csv", "summary.json"]  # no temp files
