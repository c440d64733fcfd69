"""Two grid stores side by side: the same rows run with one setting changed (e.g. pre-training length).

For every ``(method, L, seed)`` both stores finished, :func:`compare_stores` takes the best validation Dice of
the fine-tune (the value its best checkpoint was chosen by, the basis for a decision) and the test Dice of the
evaluate run, and reports each store's mean ± std over seeds and the per-seed difference B - A
(:func:`metacontrast.workflows.results.paired_gain`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .pictures import RunStore
from .results import MISSING, collect_evaluate_runs, format_gain, markdown_head, paired_gain

__all__ = ["compare_stores", "validation_rows"]

VAL_METRIC = "val_mean_dice"


def validation_rows(store: RunStore, methods: Sequence[str]) -> list[dict[str, Any]]:
    """One row per newest FINISHED fine-tune of each ``(method, L, seed)``: ``val_dice_best``, the highest
    ``val_mean_dice`` of its history (NaN when it never validated)."""
    rows, seen = [], set()
    for method in methods:
        for run in store.runs("finetune", method=method):  # newest first
            key = (method, int(run.data.tags["num_labeled"]), int(run.data.tags["seed"]))
            if key in seen:
                continue
            seen.add(key)
            _, values = store.history(run.info.run_id, VAL_METRIC)
            rows.append({"method": key[0], "num_labeled": key[1], "seed": key[2], "used": True,
                         "val_dice_best": float(values.max()) if values.size else float("nan")})
    return rows


def _mean_std(rows: Sequence[dict[str, Any]], method: str, num_labeled: int, metric: str) -> str:
    values = np.asarray([r[metric] for r in rows if r["method"] == method and r["num_labeled"] == num_labeled
                         and r.get("used", True) and not math.isnan(float(r[metric]))], dtype=float)
    return MISSING if not values.size else f"{values.mean():.3f} ± {values.std():.3f} ({values.size})"


def compare_stores(dataset: str, store_a: str, store_b: str, methods: Sequence[str], labels: tuple[str, str] = ("A", "B"),
                   experiment_name: str | None = None) -> str:
    """Markdown table comparing the rows ``methods`` of two MLflow stores (tracking URIs) of one dataset.

    Returns the table; columns: validation Dice of A and B (mean ± std over seeds (n)), B - A per seed, then
    the same for test Dice.
    """
    tagged: dict[str, list[dict[str, Any]]] = {"val_dice_best": [], "test_dice_mean": []}
    for uri, label in ((store_a, labels[0]), (store_b, labels[1])):
        store = RunStore(uri, dataset, experiment_name)
        for row in validation_rows(store, methods):
            tagged["val_dice_best"].append({**row, "method": f"{row['method']} [{label}]"})
        for row in collect_evaluate_runs(uri, dataset, methods, experiment_name):
            tagged["test_dice_mean"].append({**row, "method": f"{row['method']} [{label}]"})
    a, b = labels
    lines = markdown_head(f"{dataset}: {b} against {a}, same rows and seeds",
                          ["Row", "L", f"val Dice {a}", f"val Dice {b}", f"{b} - {a} (val, per seed)",
                           f"test Dice {a}", f"test Dice {b}", f"{b} - {a} (test, per seed)"])
    keys = sorted({(r["method"].rsplit(" [", 1)[0], r["num_labeled"]) for rows in tagged.values() for r in rows})
    for method, num_labeled in keys:
        cells = []
        for metric, rows in tagged.items():
            cells += [_mean_std(rows, f"{method} [{a}]", num_labeled, metric), _mean_std(rows, f"{method} [{b}]", num_labeled, metric),
                      format_gain(paired_gain(rows, f"{method} [{b}]", f"{method} [{a}]", num_labeled, metric))]
        lines.append(f"| {method} | {num_labeled} | " + " | ".join(cells) + " |")
    lines += ["", "Validation Dice: the best `val_mean_dice` of each fine-tune (the value its checkpoint was chosen by); "
              "test Dice: its evaluate run. Mean ± std over seeds (n); differences per seed, as in `paper_comparison.md`. "
              "Made by `scripts/compare_stores.py` (`metacontrast.workflows.compare`).", ""]
    return "\n".join(lines)
