"""Results tables and plots, made only from logged MLflow evaluate runs.

:func:`write_results` reads every FINISHED run tagged ``workflow=evaluate`` and ``dataset=<name>``
(tags ``method``, ``num_labeled``, ``seed``, ``config_hash``; metrics ``test_dice_mean``,
``test_hd95_mean``, ``test_asd_mean``) and writes into ``out_dir``:

* ``evaluate_runs.csv``: one row per run; ``used`` marks the run counted for its
  ``(method, L, seed)`` (the newest, when a combination was evaluated more than once);
* ``table.md``: the layout of the GCL paper's Table 1: one row per method, one column per L,
  cells ``mean ± std`` of the per-run test Dice over seeds, with HD95 and ASD (mm) as further
  column groups and the number of seeds per L;
* ``dice_vs_L.png``: Dice against L per row, error bars = std over seeds, a colour per method and a line
  style per recipe, keyed beside the axes (:mod:`metacontrast.reporting.dice_plot`);
* ``paper_comparison.md``: each method's gain over random init fine-tuned with the same recipe beside the
  papers' gains;
* ``ablations.md``: each variant (``gcl/no_filter@improved``) or add-on (``gcl+mean_teacher@improved``)
  against its full method, beside the paper's matching difference;
* ``probes.md``: the representation probes of every encoder in the store (``workflow=probe`` runs,
  :mod:`metacontrast.reporting.probe_results`), when there are any.

Aggregates and paired gains are :mod:`metacontrast.reporting.tables`' (std over seeds with ``ddof=0``); the
published numbers and the tables beside them are :mod:`metacontrast.reporting.papers`'.
Undefined distances (a run whose every prediction was empty has no HD95) are left out of the
mean and the cell is marked ``†``.  Nothing in these files is typed in by hand, and no time
stamps are written, so rerunning on the same runs gives the same bytes.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write
from ..tracking import RunStore, metric_value, runs_as_records, search_runs
from ..tracking.store import STORE_FILE, reading_uri, snapshot_store
from .dice_plot import plot_dice
from .papers import format_ablations, format_paper_comparison, format_validation
from .probe_results import write_probe_table
from .tables import MISSING, PARTIAL, TABLE_METRICS, aggregate, cell, labeled_order, markdown_head, method_order

#: the copy of the grid's store a results folder keeps beside its tables
STORE_SNAPSHOT = f"{STORE_FILE}.xz"

__all__ = ["CSV_COLUMNS", "VAL_METRIC", "collect_evaluate_runs", "format_table", "read_evaluate_csv", "run_configs", "validation_rows",
           "write_results"]

CSV_COLUMNS = (
    "run_id", "run_name", "method", "dataset", "num_labeled", "seed", "config_hash", "norm", "used",
    "test_dice_mean", "test_hd95_mean", "test_asd_mean",
)  # fmt: skip


def collect_evaluate_runs(
    tracking_uri: str,
    dataset: str,
    methods: Sequence[str] | None = None,
    experiment_name: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per FINISHED evaluate run of ``dataset`` (in ``methods`` if given), sorted by method, L, seed.

    ``used`` is ``True`` for the newest run of each ``(method, num_labeled, seed)``; ``norm`` is the U-Net's
    normalisation layer, logged by the fine-tune run of the same ``(method, num_labeled, seed)``.
    ``experiment_name=None`` searches every experiment of the store.
    """
    runs = search_runs(
        tracking_uri, experiment_name, {"workflow": "evaluate", "dataset": dataset}, output_dir, status="FINISHED"
    )
    networks = _finetune_norms(tracking_uri, dataset, experiment_name, output_dir)
    rows = []
    for record in runs_as_records(runs):
        tags, metrics = record["tags"], record["metrics"]
        if methods is not None and tags.get("method") not in methods:
            continue
        try:
            num_labeled, seed = int(tags["num_labeled"]), int(tags["seed"])
        except (KeyError, ValueError):
            continue  # not a grid run (no L / seed): not part of a table
        rows.append(
            {
                "run_id": record["run_id"],
                "run_name": record["run_name"],
                "method": tags.get("method", ""),
                "dataset": dataset,
                "num_labeled": num_labeled,
                "seed": seed,
                "config_hash": tags.get("config_hash", ""),
                "norm": networks.get((tags.get("method", ""), num_labeled, seed), ""),
                "start_time": record["start_time"],
                **{metric: metric_value(metrics.get(metric)) for _, metric, _ in TABLE_METRICS},
            }
        )
    rows.sort(key=lambda r: (-r["start_time"]))
    seen: set[tuple[str, int, int]] = set()
    for row in rows:  # newest first: the first of each key is the one counted
        key = (row["method"], row["num_labeled"], row["seed"])
        row["used"] = key not in seen
        seen.add(key)
    rows.sort(key=lambda r: (r["method"], r["num_labeled"], r["seed"], -r["start_time"]))
    return rows


def _finetune_norms(tracking_uri: str, dataset: str, experiment_name: str | None,
                    output_dir: str | os.PathLike[str] | None) -> dict[tuple[str, int, int], str]:
    """``{(method, L, seed): norm}`` of the newest FINISHED fine-tune of each."""
    found: dict[tuple[str, int, int], str] = {}
    runs = search_runs(tracking_uri, experiment_name, {"workflow": "finetune", "dataset": dataset}, output_dir, status="FINISHED")
    for record in runs_as_records(runs):  # newest first
        tags = record["tags"]
        try:
            key = (tags.get("method", ""), int(tags["num_labeled"]), int(tags["seed"]))
        except (KeyError, ValueError):
            continue
        found.setdefault(key, record["params"].get("norm", ""))
    return found


def format_table(
    agg: Mapping[tuple[str, int], Mapping[str, Any]],
    dataset: str,
    methods: Sequence[str] | None = None,
    labeled: Sequence[int] | None = None,
    anchors: bool = True,
) -> str:
    """Markdown table: rows = methods, column groups Dice | HD95 | ASD over L, then the seed counts.

    Each method cell carries an HTML anchor ``method-<name>`` (unless ``anchors`` is false) so a model
    card can link to its row.
    """
    methods = method_order(agg, methods)
    labeled = labeled_order(agg, labeled)
    header = ["Method"] + [f"{label} L={num}" for label, _, _ in TABLE_METRICS for num in labeled] + ["Seeds"]
    lines = markdown_head(f"{dataset}: test set, mean ± std over seeds (L = labelled training volumes)", header)
    for method in methods:
        entries = [agg.get((method, num)) for num in labeled]
        cells = [cell(e, metric, dec) for _, metric, dec in TABLE_METRICS for e in entries]
        seeds = "/".join(str(e["seeds"]) if e else "0" for e in entries)
        name = method.replace("|", "\\|")
        anchor = f'<a id="method-{method}"></a>' if anchors else ""
        lines.append(f"| {anchor}{name} | " + " | ".join(cells) + f" | {seeds} |")
    lines += [
        "",
        f"Dice: 3D Dice per foreground class averaged over classes, per test volume, then over volumes; "
        f"HD95 and ASD in mm on the original voxel grid. Std is the population std (ddof=0) over seeds; "
        f"Seeds lists the number of seeds per L. {PARTIAL}: some seeds had no defined distance "
        f"(empty predictions) and are left out of that mean. {MISSING}: no finished run. "
        f"Made by `metacontrast.reporting.results.write_results` from MLflow evaluate runs only.",
        "",
    ]
    return "\n".join(lines)


def read_evaluate_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of an ``evaluate_runs.csv`` written by :func:`write_results`, typed as :func:`aggregate` expects."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["num_labeled"], row["seed"], row["used"] = int(row["num_labeled"]), int(row["seed"]), row["used"] == "True"
        row.setdefault("norm", "")
        for _, metric, _ in TABLE_METRICS:
            row[metric] = metric_value(row[metric])
    return rows


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

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


def write_results(
    tracking_uri: str,
    dataset: str,
    out_dir: str | os.PathLike[str],
    methods: Sequence[str] | None = None,
    labeled: Sequence[int] | None = None,
    experiment_name: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Write ``evaluate_runs.csv``, ``table.md``, ``dice_vs_L.png``, ``paper_comparison.md``, ``ablations.md``,
    ``validation.md`` (the decision table: best validation Dice and its per-seed gain over random init) and
    ``runs.json`` for ``dataset`` into ``out_dir``, ``probes.md`` when the store holds probe runs
    (:func:`metacontrast.reporting.probe_results.write_probe_table`), and ``mlruns.db.xz``, the store itself
    when it is a SQLite file (:func:`~metacontrast.tracking.store.snapshot_store`: every table here can be
    re-derived from it, and a grid continued in it, once the machine that ran it is gone).

    Args:
        tracking_uri: the MLflow store the grid logged to (empty: ``<output_dir>/mlruns.db``).
        dataset: the ``dataset`` tag of the evaluate runs.
        out_dir: where the files go (e.g. ``results/<dataset>``).
        methods: the rows, in order (e.g. ``["random", "gcl", "gcl+mean_teacher"]``); ``None``
            takes every method found, sorted.
        labeled: the L columns (e.g. ``[1, 2, 8]``; an L without runs shows ``–``); ``None``
            takes every L found.
        experiment_name: restrict to one experiment (``None``: all).
        output_dir: the local store's folder, for an empty ``tracking_uri`` or a server outage.

    Returns:
        ``{"csv", "table", "plot", "comparison", "ablations", "validation", "runs"}`` (and ``"probes"``, ``"store"``): the paths written.

    Raises:
        LookupError: no finished evaluate run of ``dataset`` (and ``methods``) in the store.
    """
    rows = collect_evaluate_runs(tracking_uri, dataset, methods, experiment_name, output_dir)
    if not rows:
        raise LookupError(f"no FINISHED evaluate runs of dataset {dataset!r} in {tracking_uri or output_dir}")
    out = Path(out_dir)
    agg = aggregate(rows)
    paths = {"csv": out / "evaluate_runs.csv", "table": out / "table.md", "plot": out / "dice_vs_L.png",
             "comparison": out / "paper_comparison.md", "ablations": out / "ablations.md", "validation": out / "validation.md",
             "runs": out / "runs.json"}
    _write_csv(rows, paths["csv"])
    with atomic_write(paths["table"]) as handle:
        handle.write(format_table(agg, dataset, methods, labeled))
    plot_dice(agg, paths["plot"], dataset, methods, labeled)
    with atomic_write(paths["comparison"]) as handle:
        handle.write(format_paper_comparison(rows, dataset))
    with atomic_write(paths["ablations"]) as handle:
        handle.write(format_ablations(rows, dataset))
    uri = reading_uri(tracking_uri, output_dir)
    store = RunStore(uri, dataset, experiment_name)
    with atomic_write(paths["validation"]) as handle:
        handle.write(format_validation(validation_rows(store, sorted({r["method"] for r in rows})), rows, dataset))
    with atomic_write(paths["runs"]) as handle:
        json.dump(run_configs(tracking_uri, dataset, experiment_name, output_dir), handle, indent=1, sort_keys=True)
        handle.write("\n")
    probes = write_probe_table(tracking_uri, dataset, out, experiment_name=experiment_name, output_dir=output_dir)
    if probes is not None:
        paths["probes"] = probes
    store_copy = snapshot_store(uri, out / STORE_SNAPSHOT)
    if store_copy is not None:
        paths["store"] = store_copy
    return paths


def run_configs(tracking_uri: str, dataset: str, experiment_name: str | None = None,
                output_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every FINISHED run of ``dataset`` (pre-training, fine-tune, evaluate) with its tags and logged config:
    what traces each number of the table to its settings, seed and labelled volumes."""
    records = runs_as_records(search_runs(tracking_uri, experiment_name, {"dataset": dataset}, output_dir, status="FINISHED"))
    keep = lambda tags: {k: v for k, v in tags.items() if not k.startswith("mlflow.")}
    return sorted(({"run_id": r["run_id"], "run_name": r["run_name"], "tags": keep(r["tags"]), "params": r["params"]}
                   for r in records), key=lambda r: (r["run_name"], r["run_id"]))
