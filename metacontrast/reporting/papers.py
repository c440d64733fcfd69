"""Our gains beside the published ones: the papers' Dice and ablation differences, and the tables that set
our rows beside them (``paper_comparison.md``, ``ablations.md``, the gains summary of the model cards)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..method_name import split_method_name
from ..variants import paper_row
from .tables import (MISSING, aggregate, cell, format_gain, full_method, is_random_row, labeled_order, markdown_head,
                     mean_std_cell, paired_gain, random_reference, signed)

__all__ = ["PAPER_ABLATIONS", "PAPER_DICE", "format_ablations", "format_gains", "format_paper_comparison"]

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


def format_paper_comparison(rows: Sequence[Mapping[str, Any]], dataset: str) -> str:
    """Markdown: our Dice and gain over our random init beside the paper's Dice and gain, per method and L.

    A row fine-tuned with a named recipe (``gcl@improved``) is compared with random init under the same
    recipe and of the same network (:func:`random_reference`), paired by seed (:func:`paired_gain`), and with
    the paper's row of its method (``gcl``), whose gain is taken over the random-init row of the same paper.
    """
    papers = PAPER_DICE.get(dataset, {})
    agg = aggregate(rows)
    lines = markdown_head(f"{dataset}: our gains over random init beside the papers' (test Dice)",
                          ["Method", "L", "ours: mean ± std over seeds", "ours - random (same recipe and network): per-seed mean ± std (n)",
                           "paper", "paper - its random", "source"])
    for method, num_labeled in sorted(agg, key=lambda k: (split_method_name(k[0]).recipe, not is_random_row(k[0]), k[0], k[1])):
        gain = {"n": 0} if is_random_row(method) else paired_gain(rows, method, random_reference(rows, method), num_labeled)
        source, paper_base, values = papers.get(paper_row(method), ("", None, {}))
        paper = values.get(num_labeled, float("nan"))
        paper_gain = paper - papers[paper_base][2].get(num_labeled, float("nan")) if paper_base in papers else float("nan")
        paper_cell = MISSING if math.isnan(paper) else f"{paper:.3f}"
        lines.append(f"| {method} | {num_labeled} | {cell(agg[(method, num_labeled)], 'test_dice_mean', 3)} | {format_gain(gain)} "
                     f"| {paper_cell} | {signed(paper_gain)} | {source or MISSING} |")
    lines += ["", "Ours: from the MLflow evaluate runs in `evaluate_runs.csv`; a gain is the mean ± std over seeds of the "
              "per-seed difference (a seed draws the same labelled volumes for every method), n the seeds both rows "
              "have; a gain within about one std of zero is not evidence either way. Papers: the published tables named "
              "in the source column (their own scale and splits). Made by `metacontrast.reporting.results.write_results`.", ""]
    return "\n".join(lines)


def format_validation(val_rows: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], dataset: str) -> str:
    """Markdown: each row's best validation Dice (``val_rows``, :func:`~metacontrast.reporting.results.validation_rows`)
    and its per-seed gain over random init of the same recipe and network (:func:`random_reference`, the network
    read off the evaluate ``rows``): the table settings are decided on; the test split is read once per final run."""
    norms = {row["method"]: row.get("norm", "") for row in rows}
    val = [{**row, "norm": norms.get(row["method"], "")} for row in val_rows]
    keys = sorted({(r["method"], r["num_labeled"]) for r in val},
                  key=lambda k: (split_method_name(k[0]).recipe, not is_random_row(k[0]), k[0], k[1]))
    lines = markdown_head(f"{dataset}: best validation Dice, and the gain over random init of the same recipe and network",
                          ["Row", "L", "val Dice: mean ± std (n)", "compared with", "gain (val, per seed): mean ± std (n)"])
    for method, num_labeled in keys:
        dice = mean_std_cell(val, method, num_labeled, "val_dice_best")
        reference = "" if is_random_row(method) else random_reference(val, method)
        gain = MISSING if not reference else format_gain(paired_gain(val, method, reference, num_labeled, "val_dice_best"))
        lines.append(f"| {method} | {num_labeled} | {dice} | {reference or '(reference)'} | {gain} |")
    lines += ["", "Validation Dice: the best `val_mean_dice` of each fine-tune on the `val` split (the value its checkpoint "
              "was chosen by). Gains are paired by seed as in `paper_comparison.md`. Made by "
              "`metacontrast.reporting.results.write_results`.", ""]
    return "\n".join(lines)


def format_gains(rows: Sequence[Mapping[str, Any]], dataset: str, labeled: Sequence[int] | None = None) -> str:
    """Markdown summary: random init's test Dice per recipe, then every other row's per-seed gain over random
    init with the same recipe (ablations and add-ons: over their full method when it ran), one column per L."""
    agg = aggregate(rows)
    labeled = labeled_order(agg, labeled)
    methods = sorted({m for m, _ in agg}, key=lambda m: (split_method_name(m).recipe, not is_random_row(m), full_method(m) != m, m))
    lines = markdown_head(f"{dataset}: random init's test Dice, every other row's gain (per seed, mean ± std (n))",
                          ["Row", "compared with"] + [f"L={num}" for num in labeled], left_aligned=2)
    for method in methods:
        if is_random_row(method):
            cells = [cell(agg.get((method, num)), "test_dice_mean", 3) for num in labeled]
            lines.append(f"| {method} | (test Dice) | " + " | ".join(cells) + " |")
            continue
        full = full_method(method)
        # an ablation or add-on against its full method; a variant whose full method did not run (a recipe row
        # such as gcl/warmup_clip_..._batch_norm) against random init, as every full method
        reference = full if full != method and any(m == full for m, _ in agg) else random_reference(rows, method)
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
    # a variant whose full method did not run at that L (a recipe row, random/batch_norm) is no ablation here
    for method, num_labeled in sorted(k for k in agg if full_method(k[0]) != k[0] and (full_method(k[0]), k[1]) in agg):
        reference = full_method(method)
        gain = paired_gain(rows, method, reference, num_labeled)
        source, values = papers.get(paper_row(method), ("", {}))
        paper = values.get(num_labeled)
        paper_cell = MISSING if paper is None else f"{paper[0]:.3f} - {paper[1]:.3f} = {paper[0] - paper[1]:+.3f}"
        lines.append(f"| {method} | {num_labeled} | {cell(agg[(method, num_labeled)], 'test_dice_mean', 3)} | {reference} "
                     f"| {format_gain(gain)} | {paper_cell} | {source or MISSING} |")
    if len(lines) == 4:
        lines.append(f"| {MISSING} | | | | | | no ablation or add-on row whose full method ran in this grid |")
    lines += ["", "A row named `<bundle>/<variant>` removes one component of the bundle's method "
              "(`bundles/<bundle>/configs/ablations.json`), `<bundle>/<variant>.<ablation>` removes it from the "
              "variant `<bundle>/<variant>`; `<bundle>+<add-on>` adds a semi-supervised method to its fine-tune. Differences are paired by seed as in `paper_comparison.md`. Made by "
              "`metacontrast.reporting.results.write_results`.", ""]
    return "\n".join(lines)
