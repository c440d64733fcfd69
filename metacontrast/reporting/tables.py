"""The pieces every report table is made of: the metric columns, per-(method, L) aggregates over seeds,
gains paired by seed, the row a row is compared with, and Markdown cells.

Gains are paired by seed: a seed draws the same labelled volumes for every method, so the per-seed
difference removes the draw's effect, which at L = 1 moves Dice more than any method does; a gain is
reported as the mean ± std of those per-seed differences over the seeds both rows have.  The std is the
population std over seeds (``ddof=0``), as in :mod:`metacontrast.workflows.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..method_name import split_method_name, with_recipe
from ..variants import RANDOM

__all__ = ["MISSING", "PARTIAL", "TABLE_METRICS", "aggregate", "format_gain", "full_method", "is_random_row", "markdown_head",
           "mean_std_cell", "paired_gain", "random_reference", "same_recipe_random"]

#: (column label, MLflow metric, decimals) of the table's column groups, in order.
TABLE_METRICS: tuple[tuple[str, str, int], ...] = (
    ("Dice", "test_dice_mean", 3),
    ("HD95 (mm)", "test_hd95_mean", 2),
    ("ASD (mm)", "test_asd_mean", 2),
)
MISSING = "–"
PARTIAL = "†"


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(method, L): {"seeds": n, metric: {"mean", "std", "n"}}}`` over the ``used`` rows."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("used", True):
            groups.setdefault((row["method"], int(row["num_labeled"])), []).append(row)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for key, group in groups.items():
        entry: dict[str, Any] = {"seeds": len(group)}
        for _, metric, _ in TABLE_METRICS:
            values = np.asarray([v for v in (float(r[metric]) for r in group) if not math.isnan(v)])
            entry[metric] = {
                "mean": float(values.mean()) if values.size else float("nan"),
                "std": float(values.std()) if values.size else float("nan"),
                "n": int(values.size),
            }
        out[key] = entry
    return out


def cell(entry: Mapping[str, Any] | None, metric: str, decimals: int) -> str:
    if entry is None or entry[metric]["n"] == 0:
        return MISSING
    stats = entry[metric]
    mark = PARTIAL if stats["n"] < entry["seeds"] else ""
    return f"{stats['mean']:.{decimals}f} ± {stats['std']:.{decimals}f}{mark}"


def method_order(agg: Mapping[tuple[str, int], Any], methods: Sequence[str] | None) -> list[str]:
    return list(methods) if methods is not None else sorted({method for method, _ in agg})


def labeled_order(agg: Mapping[tuple[str, int], Any], labeled: Sequence[int] | None) -> list[int]:
    return sorted({int(num) for num in labeled} if labeled is not None else {num for _, num in agg})

def same_recipe_random(method: str) -> str:
    """The random-init row a method is compared with: ``gcl@improved`` -> ``random@improved``."""
    return with_recipe(RANDOM, split_method_name(method).recipe)


def is_random_row(method: str) -> bool:
    """``random``, ``random/batch_norm@improved``: a random-init reference row (no add-on)."""
    parts = split_method_name(method)
    return parts.bundle == RANDOM and not parts.add_on


def random_reference(rows: Sequence[Mapping[str, Any]], method: str) -> str:
    """The random-init row ``method`` is compared with: random init under the same recipe and of the same
    network (its ``norm``), ``gcl@improved`` fine-tuned as a batch-norm U-Net -> ``random/batch_norm@improved``
    where ``rows`` have it; otherwise :func:`same_recipe_random`."""
    norms = {row["method"]: row.get("norm", "") for row in rows}
    recipe = split_method_name(method).recipe
    same = sorted(m for m in norms if is_random_row(m) and split_method_name(m).recipe == recipe
                  and norms[m] and norms[m] == norms.get(method))
    plain = same_recipe_random(method)
    return plain if plain in same or not same else same[0]


def full_method(method: str) -> str:
    """The row an ablation or add-on is compared with: ``gcl/no_filter@improved`` and
    ``gcl+mean_teacher@improved`` -> ``gcl@improved``, ``gcl/recipe.no_filter@improved`` -> ``gcl/recipe@improved``;
    a full method is its own."""
    parts = split_method_name(method)
    return with_recipe(parts.compared_with, parts.recipe)


def mean_std_cell(rows: Sequence[Mapping[str, Any]], method: str, num_labeled: int, metric: str) -> str:
    """``"mean ± std (n)"`` of ``metric`` over the ``used`` rows of ``(method, num_labeled)`` (NaN left out), or ``–``."""
    values = np.asarray([r[metric] for r in rows if r["method"] == method and r["num_labeled"] == num_labeled
                         and r.get("used", True) and not math.isnan(float(r[metric]))], dtype=float)
    return MISSING if not values.size else f"{values.mean():.3f} ± {values.std():.3f} ({values.size})"


def paired_gain(rows: Sequence[Mapping[str, Any]], method: str, reference: str, num_labeled: int,
                metric: str = "test_dice_mean") -> dict[str, float]:
    """Mean and population std over seeds of ``metric(method) - metric(reference)`` at the same L and seed.

    Only ``used`` rows of seeds both methods have (and a defined metric) count; ``n`` says how many.
    Returns ``{"mean", "std", "n"}`` (NaN mean and std when ``n`` is 0).
    """
    def by_seed(name: str) -> dict[int, float]:
        return {int(r["seed"]): float(r[metric]) for r in rows
                if r["method"] == name and int(r["num_labeled"]) == num_labeled and r.get("used", True)
                and not math.isnan(float(r[metric]))}

    ours, theirs = by_seed(method), by_seed(reference)
    diffs = np.asarray([ours[seed] - theirs[seed] for seed in sorted(ours.keys() & theirs.keys())])
    if not diffs.size:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(diffs.mean()), "std": float(diffs.std()), "n": int(diffs.size)}


def markdown_head(title: str, columns: Sequence[str], left_aligned: int = 1) -> list[str]:
    """A Markdown table's first lines: ``### title``, a blank line, the header, its rule (the first
    ``left_aligned`` columns left-aligned, the rest right-aligned)."""
    rule = [" --- "] * left_aligned + [" ---: "] * (len(columns) - left_aligned)
    return [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "|".join(rule) + "|"]


def signed(value: float) -> str:
    return MISSING if math.isnan(value) else f"{value:+.3f}"


def format_gain(gain: Mapping[str, float]) -> str:
    """A :func:`paired_gain` as ``+0.020 ± 0.031 (3)`` (``–`` without a common seed)."""
    return MISSING if not gain["n"] else f"{gain['mean']:+.3f} ± {gain['std']:.3f} ({gain['n']})"
