"""Grid stores side by side: the same rows run with one setting changed (e.g. pre-training length).

For every ``(method, L, seed)`` both stores finished, :func:`compare_stores` takes the best validation Dice of
the fine-tune (the value its best checkpoint was chosen by, the basis for a decision) and the test Dice of the
evaluate run, and reports each store's mean ± std over seeds and the per-seed difference B - A
(:func:`metacontrast.reporting.tables.paired_gain`).

:func:`compare_pretraining` looks one step earlier, at the pre-training itself: whether an image-wise
contrastive loss leaves its chance level ``log(2N - 1)`` (every similarity equal; N slices per batch, two
views each) under each setting.  It needs no fine-tune, so it screens settings before any is fine-tuned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..tracking import RunStore
from .results import collect_evaluate_runs, validation_rows
from .tables import format_gain, markdown_head, mean_std_cell, paired_gain

__all__ = ["IMAGE_WISE_TERMS", "chance_level", "compare_pretraining", "compare_stores"]

#: MLflow metrics (prefixes) of the image-wise InfoNCE terms: GCL's per meta label (Eq. 1), SimCLR's two-view loss.
IMAGE_WISE_TERMS = ("train_img/", "train_loss/views")
YARDSTICK_SUFFIXES = ("/chance", "/min")
"""Metrics logged beside each term (its chance level and minimum for the batch, ``losses/yardsticks.py``)."""


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
            cells += [mean_std_cell(rows, f"{method} [{a}]", num_labeled, metric), mean_std_cell(rows, f"{method} [{b}]", num_labeled, metric),
                      format_gain(paired_gain(rows, f"{method} [{b}]", f"{method} [{a}]", num_labeled, metric))]
        lines.append(f"| {method} | {num_labeled} | " + " | ".join(cells) + " |")
    lines += ["", "Validation Dice: the best `val_mean_dice` of each fine-tune (the value its checkpoint was chosen by); "
              "test Dice: its evaluate run. Mean ± std over seeds (n); differences per seed, as in `paper_comparison.md`. "
              "Made by `scripts/compare_stores.py` (`metacontrast.reporting.compare`).", ""]
    return "\n".join(lines)


def chance_level(batch_size: int) -> float:
    """``log(2N - 1)``: an InfoNCE over ``2N`` images (two views of ``N`` slices) when every similarity is equal."""
    return math.log(2 * int(batch_size) - 1)


def compare_pretraining(dataset: str, stores: Sequence[tuple[str, str]], methods: Sequence[str],
                        terms: Sequence[str] = IMAGE_WISE_TERMS, experiment_name: str | None = None) -> str:
    """Markdown table of the image-wise losses of each ``(setting, method)`` pre-training against their chance level.

    Args:
        stores: ``(label, tracking URI)`` per setting, in the table's order.
        methods: the pre-training rows (``gcl``, ``simclr``); each store's newest FINISHED run of each is read.
        terms: metric names or prefixes to report (default: :data:`IMAGE_WISE_TERMS`).

    One line per logged term: its value after the first and the last logged step (epoch means), its lowest,
    the chance level of the run's ``batch_size`` and last - chance.  The settings a method was not run under
    are named below the table.
    """
    lines = markdown_head(f"{dataset}: image-wise pre-training losses against chance, log(2N - 1)",
                          ["Setting", "Method", "Term", "first", "lowest", "last", "chance", "last - chance"], left_aligned=3)
    absent: dict[str, list[str]] = {}
    for label, uri in stores:
        store = RunStore(uri, dataset, experiment_name)
        for method in methods:
            runs = store.runs("pretrain", method=method)
            if not runs:
                absent.setdefault(method, []).append(label)
                continue
            run = runs[0]
            chance = chance_level(int(run.data.params["batch_size"]))
            losses = (k for k in run.data.metrics if not k.endswith(YARDSTICK_SUFFIXES))  # the terms, not their yardsticks
            for key in sorted(k for k in losses if any(k == t or (t.endswith("/") and k.startswith(t)) for t in terms)):
                _, values = store.history(run.info.run_id, key)
                lines.append(f"| {label} | {method} | {key} | {values[0]:.3f} | {values.min():.3f} | {values[-1]:.3f} | "
                             f"{chance:.3f} | {values[-1] - chance:+.3f} |")
    lines += [""] + [f"No FINISHED {method} pre-training under: {', '.join(labels)}." for method, labels in absent.items()]
    lines += ["", "Values are the logged epoch means of each term (MLflow run of the setting's store, newest FINISHED "
              "pre-training of the method). Made by `scripts/compare_pretraining.py` (`metacontrast.reporting.compare`).", ""]
    return "\n".join(lines)
