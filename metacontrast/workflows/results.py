"""Results tables and plots, made only from logged MLflow evaluate runs.

:func:`write_results` reads every FINISHED run tagged ``workflow=evaluate`` and ``dataset=<name>``
(tags ``method``, ``num_labeled``, ``seed``, ``config_hash``; metrics ``test_dice_mean``,
``test_hd95_mean``, ``test_asd_mean``) and writes into ``out_dir``:

* ``evaluate_runs.csv``: one row per run; ``used`` marks the run counted for its
  ``(method, L, seed)`` (the newest, when a combination was evaluated more than once);
* ``table.md``: the layout of the GCL paper's Table 1: one row per method, one column per L,
  cells ``mean ± std`` of the per-run test Dice over seeds, with HD95 and ASD (mm) as further
  column groups and the number of seeds per L;
* ``dice_vs_L.png``: Dice against L per method, error bars = std over seeds;
* ``paper_comparison.md``: each method's gain over random init fine-tuned with the same recipe beside the
  papers' gains;
* ``ablations.md``: each variant (``gcl/no_filter@improved``) or add-on (``gcl+mean_teacher@improved``)
  against its full method, beside the paper's matching difference;
* ``probes.md``: the representation probes of every encoder in the store (``workflow=probe`` runs,
  :mod:`metacontrast.workflows.probe_results`), when there are any.

Gains are paired by seed: a seed draws the same labelled volumes for every method, so the per-seed
difference removes the draw's effect, which at L = 1 moves Dice more than any method does; a gain is
reported as the mean ± std of those per-seed differences over the seeds both rows have.

The std is the population std over seeds (``ddof=0``), as in :mod:`metacontrast.workflows.metrics`.
Undefined distances (a run whose every prediction was empty has no HD95) are left out of the
mean and the cell is marked ``†``.  Nothing in these files is typed in by hand, and no time
stamps are written, so rerunning on the same runs gives the same bytes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metacontrast.io import atomic_write
from metacontrast.workflows.method_name import split_method_name, with_recipe
from metacontrast.workflows.tracking import runs_as_records, search_runs

__all__ = ["aggregate", "collect_evaluate_runs", "format_ablations", "format_gain", "format_gains",
           "format_paper_comparison", "format_table", "full_method", "paired_gain", "plot_dice", "read_evaluate_csv",
           "same_recipe_random", "write_results"]

#: Published test Dice the reproduction is compared with: {dataset: {method: (source, baseline, {L: Dice})}}.
#: ``baseline`` names the random-init row of the same source (gains are taken within one source), or None.
PAPER_DICE: dict[str, dict[str, tuple[str, str | None, dict[int, float]]]] = {
    "acdc": {
        "random": ("GCL paper, Table 1", None, {1: 0.598, 2: 0.682, 8: 0.847}),
        "simclr": ("GCL paper, Table 1", "random", {1: 0.629, 2: 0.731, 8: 0.853}),
        "glcl": ("GLCL paper, Table 1", None, {1: 0.725, 2: 0.789, 8: 0.872}),
        "gcl": ("GCL paper, Table 1", "random", {1: 0.729, 2: 0.812, 8: 0.905}),
        "gcl+mean_teacher": ("GCL paper, Table 2", "random", {1: 0.762, 2: 0.842, 8: 0.913}),
        "gcl+mixup": ("GCL paper, Table 2", "random", {1: 0.754, 2: 0.833, 8: 0.911}),
        "ideal": ("IDEAL paper", None, {1: 0.738, 2: 0.846, 8: 0.879}),
    },
    "hippocampus": {
        "random": ("SPCL supplement", None, {1: 0.609, 2: 0.733, 4: 0.788}),
        "spcl": ("SPCL supplement (SP-Con)", "random", {1: 0.667, 2: 0.769, 4: 0.813}),
    },
}

#: Published differences the ablation rows are compared with: {dataset: {row: (source, {L: (with, without)})}}.
#: The GCL paper has no row "full GCL without GradMitigator"; its Table 3 analogue removes GradMitigator from the
#: image-level model (no pixel loss in either row), and GradFilter from the base model plus pixel loss.
PAPER_ABLATIONS: dict[str, dict[str, tuple[str, dict[int, tuple[float, float]]]]] = {
    "acdc": {
        "gcl/no_mitigator": ("GCL paper, Table 3: all meta labels summed naively vs with GradMitigator (image-level only)",
                             {1: (0.681, 0.709), 2: (0.784, 0.804), 8: (0.878, 0.894)}),
        "gcl/no_filter": ("GCL paper, Table 3: base + PixCL without vs with GradFilter",
                          {1: (0.635, 0.652), 2: (0.747, 0.775), 8: (0.860, 0.871)}),
        "gcl+mean_teacher": ("GCL paper, Table 2 vs Table 1: GCL + Mean Teacher vs GCL",
                             {1: (0.762, 0.729), 2: (0.842, 0.812), 8: (0.913, 0.905)}),
    },
}

#: (column label, MLflow metric, decimals) of the table's column groups, in order.
TABLE_METRICS: tuple[tuple[str, str, int], ...] = (
    ("Dice", "test_dice_mean", 3),
    ("HD95 (mm)", "test_hd95_mean", 2),
    ("ASD (mm)", "test_asd_mean", 2),
)
CSV_COLUMNS = (
    "run_id", "run_name", "method", "dataset", "num_labeled", "seed", "config_hash", "used",
    "test_dice_mean", "test_hd95_mean", "test_asd_mean",
)  # fmt: skip
MISSING = "–"
PARTIAL = "†"


def _number(value: Any) -> float:
    """A logged metric as a float; MLflow stores +-inf as +-float max, read back here as NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number if math.isfinite(number) and abs(number) < 1e300 else float("nan")


def collect_evaluate_runs(
    tracking_uri: str,
    dataset: str,
    methods: Sequence[str] | None = None,
    experiment_name: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per FINISHED evaluate run of ``dataset`` (in ``methods`` if given), sorted by method, L, seed.

    ``used`` is ``True`` for the newest run of each ``(method, num_labeled, seed)``.
    ``experiment_name=None`` searches every experiment of the store.
    """
    runs = search_runs(
        tracking_uri, experiment_name, {"workflow": "evaluate", "dataset": dataset}, output_dir, status="FINISHED"
    )
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
                "start_time": record["start_time"],
                **{metric: _number(metrics.get(metric)) for _, metric, _ in TABLE_METRICS},
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


def _cell(entry: Mapping[str, Any] | None, metric: str, decimals: int) -> str:
    if entry is None or entry[metric]["n"] == 0:
        return MISSING
    stats = entry[metric]
    mark = PARTIAL if stats["n"] < entry["seeds"] else ""
    return f"{stats['mean']:.{decimals}f} ± {stats['std']:.{decimals}f}{mark}"


def _method_order(agg: Mapping[tuple[str, int], Any], methods: Sequence[str] | None) -> list[str]:
    return list(methods) if methods is not None else sorted({method for method, _ in agg})


def _labeled_order(agg: Mapping[tuple[str, int], Any], labeled: Sequence[int] | None) -> list[int]:
    return sorted({int(num) for num in labeled} if labeled is not None else {num for _, num in agg})


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
    methods = _method_order(agg, methods)
    labeled = _labeled_order(agg, labeled)
    header = ["Method"] + [f"{label} L={num}" for label, _, _ in TABLE_METRICS for num in labeled] + ["Seeds"]
    lines = markdown_head(f"{dataset}: test set, mean ± std over seeds (L = labelled training volumes)", header)
    for method in methods:
        entries = [agg.get((method, num)) for num in labeled]
        cells = [_cell(e, metric, dec) for _, metric, dec in TABLE_METRICS for e in entries]
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
        f"Made by `metacontrast.workflows.results.write_results` from MLflow evaluate runs only.",
        "",
    ]
    return "\n".join(lines)


def plot_dice(
    agg: Mapping[tuple[str, int], Mapping[str, Any]],
    path: str | os.PathLike[str],
    dataset: str,
    methods: Sequence[str] | None = None,
    labeled: Sequence[int] | None = None,
) -> Path:
    """PNG of test Dice against L (log2 axis) per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = _method_order(agg, methods)
    labeled = _labeled_order(agg, labeled)
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    try:
        for method in methods:
            points = [(num, agg[(method, num)]["test_dice_mean"]) for num in labeled if (method, num) in agg]
            points = [(num, s) for num, s in points if s["n"]]
            if points:
                ax.errorbar(
                    [num for num, _ in points], [s["mean"] for _, s in points], yerr=[s["std"] for _, s in points],
                    marker="o", capsize=4, label=method,
                )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(labeled, [str(num) for num in labeled])
        ax.minorticks_off()
        ax.margins(x=0.1)
        ax.set_xlabel("labelled volumes L")
        ax.set_ylabel("test Dice (mean ± std over seeds)")
        ax.set_title(f"{dataset}: Dice against L")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return Path(path)


def read_evaluate_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of an ``evaluate_runs.csv`` written by :func:`write_results`, typed as :func:`aggregate` expects."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["num_labeled"], row["seed"], row["used"] = int(row["num_labeled"]), int(row["seed"]), row["used"] == "True"
        for _, metric, _ in TABLE_METRICS:
            row[metric] = _number(row[metric])
    return rows


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def same_recipe_random(method: str, baseline: str = "random") -> str:
    """The random-init row a method is compared with: ``gcl@improved`` -> ``random@improved``."""
    return with_recipe(baseline, split_method_name(method).recipe)


def full_method(method: str) -> str:
    """The row an ablation or add-on is compared with: ``gcl/no_filter@improved`` and
    ``gcl+mean_teacher@improved`` -> ``gcl@improved``; a full method is its own."""
    parts = split_method_name(method)
    return with_recipe(parts.bundle, parts.recipe)


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


def _signed(value: float) -> str:
    return MISSING if math.isnan(value) else f"{value:+.3f}"


def format_gain(gain: Mapping[str, float]) -> str:
    """A :func:`paired_gain` as ``+0.020 ± 0.031 (3)`` (``–`` without a common seed)."""
    return MISSING if not gain["n"] else f"{gain['mean']:+.3f} ± {gain['std']:.3f} ({gain['n']})"


def format_paper_comparison(rows: Sequence[Mapping[str, Any]], dataset: str, baseline: str = "random") -> str:
    """Markdown: our Dice and gain over our random init beside the paper's Dice and gain, per method and L.

    A row fine-tuned with a named recipe (``gcl@improved``) is compared with random init under the same
    recipe (``random@improved``), paired by seed (:func:`paired_gain`), and with the paper's row of its
    method (``gcl``), whose gain is taken over the random-init row of the same paper.
    """
    papers = PAPER_DICE.get(dataset, {})
    agg = aggregate(rows)
    lines = markdown_head(f"{dataset}: our gains over random init beside the papers' (test Dice)",
                          ["Method", "L", "ours: mean ± std over seeds", "ours - random (same recipe): per-seed mean ± std (n)",
                           "paper", "paper - its random", "source"])
    is_baseline = lambda method: method == same_recipe_random(method, baseline)
    for method, num_labeled in sorted(agg, key=lambda k: (split_method_name(k[0]).recipe, not is_baseline(k[0]), k[0], k[1])):
        gain = {"n": 0} if is_baseline(method) else paired_gain(rows, method, same_recipe_random(method, baseline), num_labeled)
        source, paper_base, values = papers.get(split_method_name(method).without_recipe, ("", None, {}))
        paper = values.get(num_labeled, float("nan"))
        paper_gain = paper - papers[paper_base][2].get(num_labeled, float("nan")) if paper_base in papers else float("nan")
        paper_cell = MISSING if math.isnan(paper) else f"{paper:.3f}"
        lines.append(f"| {method} | {num_labeled} | {_cell(agg[(method, num_labeled)], 'test_dice_mean', 3)} | {format_gain(gain)} "
                     f"| {paper_cell} | {_signed(paper_gain)} | {source or MISSING} |")
    lines += ["", "Ours: from the MLflow evaluate runs in `evaluate_runs.csv`; a gain is the mean ± std over seeds of the "
              "per-seed difference (a seed draws the same labelled volumes for every method), n the seeds both rows "
              "have; a gain within about one std of zero is not evidence either way. Papers: the published tables named "
              "in the source column (their own scale and splits). Made by `metacontrast.workflows.results.write_results`.", ""]
    return "\n".join(lines)


def format_gains(rows: Sequence[Mapping[str, Any]], dataset: str, labeled: Sequence[int] | None = None) -> str:
    """Markdown summary: random init's test Dice per recipe, then every other row's per-seed gain over random
    init with the same recipe (ablations and add-ons: over their full method), one column per L."""
    agg = aggregate(rows)
    labeled = _labeled_order(agg, labeled)
    methods = sorted({m for m, _ in agg}, key=lambda m: (split_method_name(m).recipe, m != same_recipe_random(m), full_method(m) != m, m))
    lines = markdown_head(f"{dataset}: random init's test Dice, every other row's gain (per seed, mean ± std (n))",
                          ["Row", "compared with"] + [f"L={num}" for num in labeled], left_aligned=2)
    for method in methods:
        if method == same_recipe_random(method):
            cells = [_cell(agg.get((method, num)), "test_dice_mean", 3) for num in labeled]
            lines.append(f"| {method} | (test Dice) | " + " | ".join(cells) + " |")
            continue
        reference = full_method(method) if full_method(method) != method else same_recipe_random(method)
        cells = [format_gain(paired_gain(rows, method, reference, num)) for num in labeled]
        lines.append(f"| {method} | {reference} | " + " | ".join(cells) + " |")
    lines += ["", f"From `{dataset}/evaluate_runs.csv`; details in `{dataset}/paper_comparison.md` and `{dataset}/ablations.md`.", ""]
    return "\n".join(lines)


def format_ablations(rows: Sequence[Mapping[str, Any]], dataset: str) -> str:
    """Markdown: each variant or add-on row against its full method at the same seeds, beside the paper's
    matching difference (:data:`PAPER_ABLATIONS`)."""
    papers = PAPER_ABLATIONS.get(dataset, {})
    agg = aggregate(rows)
    lines = markdown_head(f"{dataset}: ablations and add-ons against the full method (test Dice)",
                          ["Row", "L", "ours", "full method", "ours - full: per-seed mean ± std (n)",
                           "paper: its analogue - full", "source"])
    for method, num_labeled in sorted(k for k in agg if full_method(k[0]) != k[0]):
        reference = full_method(method)
        gain = paired_gain(rows, method, reference, num_labeled)
        source, values = papers.get(split_method_name(method).without_recipe, ("", {}))
        paper = values.get(num_labeled)
        paper_cell = MISSING if paper is None else f"{paper[0]:.3f} - {paper[1]:.3f} = {paper[0] - paper[1]:+.3f}"
        lines.append(f"| {method} | {num_labeled} | {_cell(agg[(method, num_labeled)], 'test_dice_mean', 3)} | {reference} "
                     f"| {format_gain(gain)} | {paper_cell} | {source or MISSING} |")
    if len(lines) == 4:
        lines.append(f"| {MISSING} | | | | | | no ablation or add-on rows in this grid |")
    lines += ["", "A row named `<bundle>/<variant>` removes one component of the bundle's method "
              "(`bundles/<bundle>/configs/ablations.json`); `<bundle>+<add-on>` adds a semi-supervised method to its "
              "fine-tune. Differences are paired by seed as in `paper_comparison.md`. Made by "
              "`metacontrast.workflows.results.write_results`.", ""]
    return "\n".join(lines)


def write_results(
    tracking_uri: str,
    dataset: str,
    out_dir: str | os.PathLike[str],
    methods: Sequence[str] | None = None,
    labeled: Sequence[int] | None = None,
    experiment_name: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Write ``evaluate_runs.csv``, ``table.md``, ``dice_vs_L.png``, ``paper_comparison.md``, ``ablations.md``
    and ``runs.json`` for ``dataset`` into ``out_dir``, and ``probes.md`` when the store holds probe runs
    (:func:`metacontrast.workflows.probe_results.write_probe_table`).

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
        ``{"csv", "table", "plot", "comparison", "ablations", "runs"}`` (and ``"probes"``): the paths written.

    Raises:
        LookupError: no finished evaluate run of ``dataset`` (and ``methods``) in the store.
    """
    rows = collect_evaluate_runs(tracking_uri, dataset, methods, experiment_name, output_dir)
    if not rows:
        raise LookupError(f"no FINISHED evaluate runs of dataset {dataset!r} in {tracking_uri or output_dir}")
    out = Path(out_dir)
    agg = aggregate(rows)
    paths = {"csv": out / "evaluate_runs.csv", "table": out / "table.md", "plot": out / "dice_vs_L.png",
             "comparison": out / "paper_comparison.md", "ablations": out / "ablations.md", "runs": out / "runs.json"}
    _write_csv(rows, paths["csv"])
    with atomic_write(paths["table"]) as handle:
        handle.write(format_table(agg, dataset, methods, labeled))
    plot_dice(agg, paths["plot"], dataset, methods, labeled)
    with atomic_write(paths["comparison"]) as handle:
        handle.write(format_paper_comparison(rows, dataset))
    with atomic_write(paths["ablations"]) as handle:
        handle.write(format_ablations(rows, dataset))
    with atomic_write(paths["runs"]) as handle:
        json.dump(run_configs(tracking_uri, dataset, experiment_name, output_dir), handle, indent=1, sort_keys=True)
        handle.write("\n")
    from .probe_results import write_probe_table  # it imports this module's table helpers

    probes = write_probe_table(tracking_uri, dataset, out, experiment_name=experiment_name, output_dir=output_dir)
    if probes is not None:
        paths["probes"] = probes
    return paths


def run_configs(tracking_uri: str, dataset: str, experiment_name: str | None = None,
                output_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every FINISHED run of ``dataset`` (pre-training, fine-tune, evaluate) with its tags and logged config:
    what traces each number of the table to its settings, seed and labelled volumes."""
    records = runs_as_records(search_runs(tracking_uri, experiment_name, {"dataset": dataset}, output_dir, status="FINISHED"))
    keep = lambda tags: {k: v for k, v in tags.items() if not k.startswith("mlflow.")}
    return sorted(({"run_id": r["run_id"], "run_name": r["run_name"], "tags": keep(r["tags"]), "params": r["params"]}
                   for r in records), key=lambda r: (r["run_name"], r["run_id"]))
