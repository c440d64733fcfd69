"""The results section of each model card, written from the committed results (never typed by hand).

A card (``bundles/<bundle>/docs/README.md``) marks its results block::

    <!-- results:begin -->
    ... replaced on every run ...
    <!-- results:end -->

:func:`write_card_results` replaces the block with one table per dataset that has runs of the bundle:
its rows (``gcl``, ``gcl/naive_sum``, ``gcl+mean_teacher``, and each of them under a fine-tune recipe,
``gcl@improved``) beside random init under the same recipes, mean ± std over seeds, made by
:func:`metacontrast.reporting.results.format_table` from ``results/<dataset>/evaluate_runs.csv`` (which
holds each run's MLflow id and config hash).  :func:`write_summary` fills the same block in
``results/README.md`` with every dataset's gains (:func:`metacontrast.reporting.papers.format_gains`), so its
reading can quote numbers none of which is typed by hand.  Text outside the markers is left as it is, and the
same results give the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_write
from ..method_name import split_method_name
from .papers import format_gains
from .results import format_table, read_evaluate_csv
from .tables import aggregate, is_random_row, same_recipe_random

__all__ = ["BEGIN", "END", "card_rows", "replace_block", "write_card_results", "write_summary"]

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def card_rows(methods: set[str], bundle: str) -> list[str]:
    """The bundle's rows and, for every recipe they use, the random-init rows of that recipe (``random``, then
    ``random/<variant>``: random init of another network); paper recipe first."""
    own = sorted(m for m in methods if split_method_name(m).bundle == bundle)
    rows: list[str] = []
    for recipe in sorted({split_method_name(m).recipe for m in own}):
        mine = [m for m in own if split_method_name(m).recipe == recipe]
        plain = same_recipe_random(mine[0])
        baselines = sorted((m for m in methods if is_random_row(m) and split_method_name(m).recipe == recipe and m not in own),
                           key=lambda m: (m != plain, m))
        rows += baselines + mine
    return rows


def _block(bundle: str, results_dir: Path, card_dir: Path) -> str:
    parts = [BEGIN, "", "<!-- written by scripts/write_cards.py from results/*/evaluate_runs.csv; do not edit -->", ""]
    for csv_path in sorted(results_dir.glob("*/evaluate_runs.csv")):
        rows = read_evaluate_csv(csv_path)
        methods = card_rows({r["method"] for r in rows}, bundle)
        if not any(split_method_name(m).bundle == bundle for m in methods):
            continue
        table = format_table(aggregate([r for r in rows if r["method"] in methods]), csv_path.parent.name, methods, anchors=False)
        link = Path(os.path.relpath(csv_path.parent, card_dir)).as_posix()
        parts += [table.rstrip("\n"), "", f"All rows, the runs behind them and the comparison with the papers: [{link}/]({link}/).", ""]
    if len(parts) == 4:
        parts += ["No finished runs of this method in the results yet.", ""]
    return "\n".join(parts + [END])


def replace_block(path: str | os.PathLike[str], block: str) -> Path:
    """Replace the text from ``BEGIN`` to ``END`` in ``path`` with ``block`` (which holds both markers).

    Raises:
        ValueError: the file lacks the markers, or has them out of order or more than once (named in the message).
    """
    path = Path(path)
    text = path.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{path}: needs exactly one '{BEGIN}' followed by one '{END}' around its results block")
    head, rest = text.split(BEGIN)
    updated = head + block + rest.split(END)[1]
    if updated != text:
        with atomic_write(path) as handle:
            handle.write(updated)
    return path


def write_card_results(card: str | os.PathLike[str], bundle: str, results_dir: str | os.PathLike[str] = "results") -> Path:
    """Replace the results block of ``card`` with the bundle's rows from ``results_dir/<dataset>/evaluate_runs.csv``."""
    return replace_block(card, _block(bundle, Path(results_dir), Path(card).parent))


def write_summary(readme: str | os.PathLike[str], results_dir: str | os.PathLike[str] = "results") -> Path:
    """Replace the results block of ``readme`` (``results/README.md``) with every dataset's gains table."""
    parts = [BEGIN, "", "<!-- written by scripts/write_cards.py from results/*/evaluate_runs.csv; do not edit -->", ""]
    for csv_path in sorted(Path(results_dir).glob("*/evaluate_runs.csv")):
        parts += [format_gains(read_evaluate_csv(csv_path), csv_path.parent.name).rstrip("\n"), ""]
    return replace_block(readme, "\n".join(parts + [END]))
