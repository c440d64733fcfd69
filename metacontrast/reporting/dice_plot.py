"""``dice_vs_L.png``: test Dice against L, one line per results row, readable with fifteen rows and more.

A row ``<method>@<recipe>`` (:mod:`metacontrast.method_name`) is drawn in its method's colour (the row name
without its recipe: ``gcl/no_filter+mean_teacher``) and its recipe's line style (no recipe is the paper's, as
``@paper`` is), so rows of one method under several recipes read as one family.  Two keys stand beside the axes,
outside them: the methods with their colours and the recipes with their line styles.  The plotting area grows
with the number of rows (:func:`plot_area`: 4.5 x 3 inches up to five rows, 6 x 4 at fifteen); the figure adds the
keys' width to the right and, when the keys are taller than the axes, their height, so no key is clipped and no
line is hidden under one.  Rows are spread a little along L (:data:`DODGE`, on the log2 axis) so that error bars
at one L do not cover each other.  Same rows, same bytes: no time stamp is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write
from ..method_name import split_method_name
from .figures import pyplot
from .tables import labeled_order, method_order

__all__ = ["AXES_IN", "DODGE", "DPI", "GROWTH_IN", "PAPER_RECIPE", "RECIPE_STYLES", "dice_figure", "method_colours", "plot_area",
           "plot_dice", "recipe_styles", "row_key"]

DPI = 120
#: (left margin, plotting area, right gap) wide and (bottom margin, plotting area, top margin) high, in inches, for
#: up to :data:`ROOMY_ROWS` rows; each further row widens the plotting area by :data:`GROWTH_IN` ``[0]`` and
#: heightens it by ``[1]``.  The figure is as wide as these and the keys, and as high as these or the keys
AXES_IN = ((0.8, 4.5, 0.3), (0.6, 3.0, 0.4))
ROOMY_ROWS = 5
GROWTH_IN = (0.15, 0.1)
#: the space around and between the two keys, in inches
KEY_PAD_IN = 0.15
#: the spread of the rows along L, in log2 units (a tick is 1 apart at L = 1, 2, 4, 8): :data:`DODGE_STEP` between
#: neighbouring rows, at most :data:`DODGE` in all
DODGE, DODGE_STEP = 0.25, 0.03
#: the name of the recipe of a row without ``@<recipe>`` (``bundles/common/configs/recipes.json``)
PAPER_RECIPE = "paper"
#: line styles of the recipes, in the order of :func:`recipe_styles` (the paper's first, solid)
RECIPE_STYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 2, 2)))
FONT = "small"


def row_key(row: str) -> tuple[str, str]:
    """``gcl/no_filter@improved`` -> (``gcl/no_filter``, ``improved``); ``gcl`` -> (``gcl``, ``paper``)."""
    parts = split_method_name(row)
    return parts.without_recipe, parts.recipe or PAPER_RECIPE


def method_colours(rows: Sequence[str]) -> dict[str, Any]:
    """One colour per method of ``rows`` (in the order they first appear): matplotlib's ten tableau colours,
    then their ten lighter partners; past twenty methods the colours repeat."""
    plt = pyplot()
    tab20 = plt.colormaps["tab20"].colors
    palette = [*tab20[0::2], *tab20[1::2]]  # tab20's even entries are tab10
    methods = list(dict.fromkeys(row_key(row)[0] for row in rows))
    return {method: palette[i % len(palette)] for i, method in enumerate(methods)}


def recipe_styles(rows: Sequence[str]) -> dict[str, Any]:
    """One line style per recipe of ``rows``: the paper's recipe solid, the others in the order they first appear;
    past :data:`RECIPE_STYLES` the styles repeat."""
    recipes = list(dict.fromkeys(row_key(row)[1] for row in rows))
    recipes.sort(key=lambda recipe: recipe != PAPER_RECIPE)  # stable: the paper's first, the rest as they came
    return {recipe: RECIPE_STYLES[i % len(RECIPE_STYLES)] for i, recipe in enumerate(recipes)}


def plot_area(rows: int) -> tuple[float, float]:
    """Width and height in inches of the plotting area for ``rows`` rows (see :data:`AXES_IN`)."""
    more = max(0, rows - ROOMY_ROWS)
    return AXES_IN[0][1] + GROWTH_IN[0] * more, AXES_IN[1][1] + GROWTH_IN[1] * more


def dice_figure(
    agg: Mapping[tuple[str, int], Mapping[str, Any]],
    dataset: str,
    methods: Sequence[str] | None = None,
    labeled: Sequence[int] | None = None,
) -> Any:
    """The figure of :func:`plot_dice`, open (the caller closes it): one ``errorbar`` per row with runs, labelled
    with the row's name, and two figure legends titled ``method`` and ``recipe``."""
    plt = pyplot()
    rows = method_order(agg, methods)
    labeled = labeled_order(agg, labeled)
    drawn = [row for row in rows if any((row, num) in agg and agg[(row, num)]["test_dice_mean"]["n"] for num in labeled)]
    colours, styles = method_colours(drawn), recipe_styles(drawn)
    fig = plt.figure(dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    step = min(DODGE_STEP, DODGE / max(1, len(drawn) - 1))
    for i, row in enumerate(drawn):
        shift = 2.0 ** (step * (i - (len(drawn) - 1) / 2))
        points = [(num, agg[(row, num)]["test_dice_mean"]) for num in labeled if (row, num) in agg]
        points = [(num, s) for num, s in points if s["n"]]
        method, recipe = row_key(row)
        ax.errorbar([num * shift for num, _ in points], [s["mean"] for _, s in points], yerr=[s["std"] for _, s in points],
                    color=colours[method], linestyle=styles[recipe], marker="o", markersize=4, capsize=3, label=row)
    ax.set_xscale("log", base=2)
    ax.set_xticks(labeled, [str(num) for num in labeled])
    ax.minorticks_off()
    ax.margins(x=0.1)
    ax.set_xlabel("labelled volumes L")
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.set_title(f"{dataset}: Dice against L")
    ax.grid(True, alpha=0.3)
    keys = [
        fig.legend([plt.Line2D([], [], color=c, marker="o", markersize=4) for c in colours.values()], list(colours),
                   title="method", loc="upper left", borderaxespad=0, fontsize=FONT, title_fontsize=FONT, alignment="left"),
        fig.legend([plt.Line2D([], [], color="0.25", linestyle=s) for s in styles.values()], list(styles),
                   title="recipe", loc="upper left", borderaxespad=0, fontsize=FONT, title_fontsize=FONT, alignment="left"),
    ]  # fmt: skip
    _lay_out(fig, ax, keys, plot_area(len(drawn)))
    return fig


def _lay_out(fig: Any, ax: Any, keys: Sequence[Any], area: tuple[float, float]) -> None:
    """Size the figure to the plotting area (``area``, inches), its labels and the keys, the keys in a column right
    of the axes.  The margins are :data:`AXES_IN`'s, or wider where the tick labels, the axis labels or the title
    need more (measured once the axes have their size), so that nothing is cut off."""
    renderer = fig.canvas.get_renderer()
    sizes = [(box.width / DPI, box.height / DPI) for box in (key.get_window_extent(renderer) for key in keys)]
    (left, _, gap), (bottom, _, top) = AXES_IN
    width, height = area
    keys_w = max(w for w, _ in sizes) + KEY_PAD_IN
    keys_h = sum(h for _, h in sizes) + KEY_PAD_IN * (len(sizes) + 1)
    for measured in (False, True):  # place with the margins, widen them to what the labels take, place again
        if measured:
            inner, outer = ax.get_window_extent(renderer), ax.get_tightbbox(renderer)
            left = max(left, (inner.x0 - outer.x0) / DPI + KEY_PAD_IN)
            bottom = max(bottom, (inner.y0 - outer.y0) / DPI + KEY_PAD_IN)
            top = max(top, (outer.y1 - inner.y1) / DPI + KEY_PAD_IN)
        fig_w = math.ceil((left + width + gap + keys_w) * DPI) / DPI
        fig_h = math.ceil(max(bottom + height + top, keys_h) * DPI) / DPI
        fig.set_size_inches(fig_w, fig_h)
        ax.set_position((left / fig_w, bottom / fig_h, width / fig_w, (fig_h - bottom - top) / fig_h))
    y = fig_h - KEY_PAD_IN
    for key, (_, h) in zip(keys, sizes):
        key.set_bbox_to_anchor(((left + width + gap) / fig_w, y / fig_h), transform=fig.transFigure)
        y -= h + KEY_PAD_IN


def plot_dice(
    agg: Mapping[tuple[str, int], Mapping[str, Any]],
    path: str | os.PathLike[str],
    dataset: str,
    methods: Sequence[str] | None = None,
    labeled: Sequence[int] | None = None,
) -> Path:
    """PNG of test Dice against L (log2 axis) per row, error bars = std over seeds (:func:`dice_figure`)."""
    fig = dice_figure(agg, dataset, methods, labeled)
    try:
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        pyplot().close(fig)
    return Path(path)
