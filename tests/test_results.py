"""Results CSV, Markdown table and plot, made from real evaluate runs in a real MLflow store."""

from __future__ import annotations

import csv
import lzma
import time
from pathlib import Path

import numpy as np
import pytest

from metacontrast.reporting.results import write_results
from metacontrast.tracking import TrackingRun, start_run

NAN = float("nan")
# (method, L, seed) -> (test_dice_mean, test_hd95_mean, test_asd_mean), as the evaluate workflow logs them
LOGGED = {
    ("random", 1, 0): (0.60, 12.0, 3.0),
    ("random", 1, 1): (0.58, 14.0, 3.5),
    ("random", 1, 2): (0.61, 13.0, 3.2),
    ("random", 2, 0): (0.68, 9.0, 2.0),
    ("random", 2, 1): (0.69, 8.0, 2.2),
    ("gcl+mean_teacher", 1, 0): (0.72, NAN, NAN),  # every prediction empty somewhere: no distances
    ("gcl+mean_teacher", 1, 1): (0.74, 10.0, 2.5),
}
SUPERSEDED = ("random", 1, 0, (0.10, 99.0, 9.0))  # an older evaluation of the same (method, L, seed)


def _log(
    out_dir: Path, method: str, num_labeled: int, seed: int, values: tuple[float, float, float], **kw: str
) -> TrackingRun:
    tags = {"workflow": "evaluate", "method": method, "dataset": "acdc", "num_labeled": num_labeled, "seed": seed}
    tags.update(kw)
    run = start_run("", "grid", f"evaluate-{method}-L{num_labeled}-s{seed}", tags, out_dir, config={"seed": seed})
    run.log_metrics(dict(zip(("test_dice_mean", "test_hd95_mean", "test_asd_mean"), values)), step=0)
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("grid")
    method, num_labeled, seed, values = SUPERSEDED
    _log(out_dir, method, num_labeled, seed, values).end()
    time.sleep(0.01)  # MLflow orders by start time in milliseconds
    for (method, num_labeled, seed), values in LOGGED.items():
        _log(out_dir, method, num_labeled, seed, values).end()
    _log(out_dir, "random", 8, 0, (0.9, 1.0, 1.0)).end("FAILED")  # not finished: not in any table
    _log(out_dir, "random", 1, 0, (0.1, 1.0, 1.0), dataset="hippocampus").end()  # another dataset
    _log(out_dir, "random", 1, 0, (0.1, 1.0, 1.0), workflow="finetune").end()  # not an evaluate run
    return out_dir


def _cell(values: list[float], decimals: int) -> str:
    arr = np.asarray([v for v in values if not np.isnan(v)])
    return f"{arr.mean():.{decimals}f} ± {arr.std():.{decimals}f}"


def _row(table: str, method: str) -> list[str]:
    line = next(line for line in table.splitlines() if f'id="method-{method}"' in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_write_results_from_runs(store: Path, tmp_path: Path) -> None:
    paths = write_results("", "acdc", tmp_path / "results" / "acdc", output_dir=store)

    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(LOGGED) + 1  # every finished acdc evaluate run, the superseded one included
    used = {(r["method"], int(r["num_labeled"]), int(r["seed"])): r for r in rows if r["used"] == "True"}
    assert set(used) == set(LOGGED)
    assert float(used[("random", 1, 0)]["test_dice_mean"]) == pytest.approx(0.60)
    assert all(len(r["run_id"]) == 32 and r["config_hash"] for r in rows)

    table = paths["table"].read_text()
    header = [cell.strip() for cell in table.splitlines()[2].strip("|").split("|")]
    groups = [f"{metric} L={num}" for metric in ("Dice", "HD95 (mm)", "ASD (mm)") for num in (1, 2)]
    assert header == ["Method", *groups, "Seeds"]
    random_l1 = [v for k, v in LOGGED.items() if k[:2] == ("random", 1)]
    random_l2 = [v for k, v in LOGGED.items() if k[:2] == ("random", 2)]
    assert _row(table, "random")[1:] == [
        _cell([v[0] for v in random_l1], 3), _cell([v[0] for v in random_l2], 3),
        _cell([v[1] for v in random_l1], 2), _cell([v[1] for v in random_l2], 2),
        _cell([v[2] for v in random_l1], 2), _cell([v[2] for v in random_l2], 2),
        "3/2",
    ]  # fmt: skip
    assert _row(table, "random")[1] == "0.597 ± 0.012"  # the superseded 0.10 is not in it
    gcl = _row(table, "gcl+mean_teacher")
    assert gcl[1] == "0.730 ± 0.010" and gcl[2] == "–"  # no L=2 run
    assert gcl[3] == "10.00 ± 0.00†"  # one seed had no HD95: mean of the other, marked
    assert gcl[-1] == "2/0"

    png = paths["plot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    again = write_results("", "acdc", tmp_path / "again", output_dir=store)
    assert again["table"].read_text() == table and again["csv"].read_bytes() == paths["csv"].read_bytes()
    assert again["plot"].read_bytes() == png  # no time stamps: same runs, same bytes

    # the store travels with the tables: restored from the folder alone, it gives the same table
    restored = tmp_path / "restored" / "mlruns.db"
    restored.parent.mkdir()
    restored.write_bytes(lzma.decompress(paths["store"].read_bytes()))
    from_copy = write_results(f"sqlite:///{restored}", "acdc", tmp_path / "from_copy")
    assert from_copy["table"].read_text() == table


def test_methods_select_and_order_rows(store: Path, tmp_path: Path) -> None:
    paths = write_results("", "acdc", tmp_path, ["gcl+mean_teacher", "spcl"], labeled=[8, 1, 2], output_dir=store)
    table = paths["table"].read_text()
    methods = [line.split("</a>")[1].split("|")[0].strip() for line in table.splitlines() if "</a>" in line]
    assert methods == ["gcl+mean_teacher", "spcl"]
    assert "| Dice L=1 | Dice L=2 | Dice L=8 |" in table
    assert _row(table, "gcl+mean_teacher")[1:4] == ["0.730 ± 0.010", "–", "–"]
    assert _row(table, "gcl+mean_teacher")[-1] == "2/0/0"
    assert _row(table, "spcl")[1:] == ["–"] * 9 + ["0/0/0"]
    with open(paths["csv"], newline="") as handle:
        assert {r["method"] for r in csv.DictReader(handle)} == {"gcl+mean_teacher"}


def test_no_runs_is_an_error(store: Path, tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="prostate"):
        write_results("", "prostate", tmp_path, output_dir=store)


def _rows(dice: dict[tuple[str, int, int], float]) -> list[dict]:
    return [{"method": m, "num_labeled": n, "seed": seed, "used": True, "test_dice_mean": v, "test_hd95_mean": NAN,
             "test_asd_mean": NAN} for (m, n, seed), v in dice.items()]


def _comparison_rows(text: str, num_labeled: int) -> dict[str, list[str]]:
    return {line.split(" | ")[0][2:]: line.split(" | ")[2:6] for line in text.splitlines()
            if line.startswith("| ") and f" | {num_labeled} | " in line}


def test_paper_comparison_takes_gains_within_each_source():
    from metacontrast.reporting.papers import format_paper_comparison

    rows = _rows({("random", 1, 0): 0.30, ("random", 1, 1): 0.40, ("gcl", 1, 0): 0.45, ("gcl", 1, 1): 0.55})
    gcl = _comparison_rows(format_paper_comparison(rows, "acdc"), 1)["gcl"]
    # ours 0.500, gain +0.150 at both seeds; paper 0.729, gain 0.729 - 0.598 = +0.131
    assert gcl == ["0.500 ± 0.050", "+0.150 ± 0.000 (2)", "0.729", "+0.131"]


def test_paper_comparison_takes_gains_within_each_recipe():
    """'gcl@improved' is compared with 'random@improved' (not the paper recipe's random row) and with the paper's 'gcl'."""
    from metacontrast.reporting.papers import format_paper_comparison

    rows = _rows({("random", 1, 0): 0.15, ("gcl", 1, 0): 0.16, ("random@improved", 1, 0): 0.30, ("gcl@improved", 1, 0): 0.40})
    got = _comparison_rows(format_paper_comparison(rows, "acdc"), 1)
    assert got["gcl@improved"] == ["0.400 ± 0.000", "+0.100 ± 0.000 (1)", "0.729", "+0.131"]
    assert got["gcl"] == ["0.160 ± 0.000", "+0.010 ± 0.000 (1)", "0.729", "+0.131"]
    assert got["random@improved"] == ["0.300 ± 0.000", "–", "0.598", "–"]


def test_a_recipe_variant_is_set_beside_the_paper_row_it_declares():
    """A variant that only changes the optimisation ('paper_row' in its ablations.json entry) is read against the
    paper's method, random init of any network against the paper's random init; a variant that removes a
    component and has no paper row of its name gets no paper cells."""
    from metacontrast.reporting.papers import format_paper_comparison
    from metacontrast.variants import bundle_variants, paper_row

    recipe = "warmup_clip_pixel003_batch_norm_image_heads"
    assert bundle_variants("gcl")[recipe]["paper_row"] == "gcl" and "paper_row" not in bundle_variants("gcl")["no_organ_state"]
    assert paper_row(f"gcl/{recipe}.no_filter@improved") == "gcl/no_filter"
    assert paper_row(f"gcl/{recipe}+mean_teacher@improved") == "gcl+mean_teacher"
    rows = _rows({("random/batch_norm@improved", 1, 0): 0.30, (f"gcl/{recipe}@improved", 1, 0): 0.40,
                  ("gcl/no_organ_state@improved", 1, 0): 0.35})
    rows = [{**row, "norm": "batch"} for row in rows]  # every row a batch-norm network: compared with random/batch_norm
    got = _comparison_rows(format_paper_comparison(rows, "acdc"), 1)
    assert got[f"gcl/{recipe}@improved"] == ["0.400 ± 0.000", "+0.100 ± 0.000 (1)", "0.729", "+0.131"]
    assert got["random/batch_norm@improved"] == ["0.300 ± 0.000", "–", "0.598", "–"]
    assert got["gcl/no_organ_state@improved"][2:] == ["–", "–"]


def test_a_row_is_compared_with_random_init_of_its_own_network():
    """A batch-norm GCL fine-tune is compared with 'random/batch_norm' of its recipe where the grid has it (the
    evaluate runs' logged norm), an instance-norm row with plain 'random'; the random rows are references."""
    from metacontrast.reporting.papers import format_gains
    from metacontrast.reporting.tables import random_reference

    rows = _rows({("random@improved", 1, 0): 0.30, ("random/batch_norm@improved", 1, 0): 0.20,
                  ("gcl@improved", 1, 0): 0.25, ("simclr@improved", 1, 0): 0.31})
    norms = {"random@improved": "instance", "random/batch_norm@improved": "batch", "gcl@improved": "batch", "simclr@improved": "instance"}
    for row in rows:
        row["norm"] = norms[row["method"]]
    assert random_reference(rows, "gcl@improved") == "random/batch_norm@improved"
    assert random_reference(rows, "simclr@improved") == "random@improved"
    assert random_reference([{**r, "norm": ""} for r in rows], "gcl@improved") == "random@improved"  # norm not logged
    lines = format_gains(rows, "acdc").splitlines()
    assert "| gcl@improved | random/batch_norm@improved | +0.050 ± 0.000 (1) |" in lines
    assert "| random/batch_norm@improved | (test Dice) | 0.200 ± 0.000 |" in lines


def test_gains_are_paired_by_seed():
    """The per-seed difference removes the labelled-volume draw: a method 0.02 above random at every seed has
    gain +0.020 ± 0.000 however far apart the seeds are; a seed only one row has is left out."""
    from metacontrast.reporting.tables import paired_gain

    rows = _rows({("random", 1, 0): 0.20, ("random", 1, 1): 0.60, ("random", 1, 2): 0.40,
                  ("gcl", 1, 0): 0.22, ("gcl", 1, 1): 0.62, ("gcl", 1, 3): 0.90})
    gain = paired_gain(rows, "gcl", "random", 1)
    assert gain["n"] == 2 and gain["mean"] == pytest.approx(0.02) and gain["std"] == pytest.approx(0.0, abs=1e-12)
    assert paired_gain(rows, "gcl", "random", 2)["n"] == 0


def test_ablations_compare_each_variant_with_its_full_method():
    from metacontrast.reporting.papers import format_ablations

    rows = _rows({("gcl@improved", 1, 0): 0.50, ("gcl@improved", 1, 1): 0.40,
                  ("gcl/no_filter@improved", 1, 0): 0.45, ("gcl/no_filter@improved", 1, 1): 0.33,
                  ("gcl+mean_teacher@improved", 1, 0): 0.55, ("random@improved", 1, 0): 0.30})
    text = format_ablations(rows, "acdc")
    got = {line.split(" | ")[0][2:]: line.split(" | ")[1:6] for line in text.splitlines() if line.startswith("| gcl")}
    assert set(got) == {"gcl/no_filter@improved", "gcl+mean_teacher@improved"}  # full methods and random are not ablations
    assert got["gcl/no_filter@improved"] == ["1", "0.390 ± 0.060", "gcl@improved", "-0.060 ± 0.010 (2)",
                                             "0.635 - 0.652 = -0.017"]
    assert got["gcl+mean_teacher@improved"][3:] == ["+0.050 ± 0.000 (1)", "0.762 - 0.729 = +0.033"]
    # an ablation of a recipe row is compared with that row, beside the paper's difference for its ablation
    rows = _rows({("gcl/recipe@improved", 1, 0): 0.50, ("gcl/recipe.no_filter@improved", 1, 0): 0.44})
    line = next(line for line in format_ablations(rows, "acdc").splitlines() if line.startswith("| gcl/recipe.no_filter"))
    assert line.split(" | ")[3:6] == ["gcl/recipe@improved", "-0.060 ± 0.000 (1)", "0.635 - 0.652 = -0.017"]


def test_validation_table_compares_each_row_with_random_init_of_its_network():
    """The decision table: best validation Dice per row and its per-seed gain over random init of the same
    recipe and network (the network read off the evaluate rows)."""
    from metacontrast.reporting.papers import format_validation

    rows = _rows({("random@improved", 1, 0): 0.3, ("random/batch_norm@improved", 1, 0): 0.3, ("gcl@improved", 1, 0): 0.3})
    for row, norm in zip(rows, ("instance", "batch", "batch")):
        row["norm"] = norm
    val = [{"method": m, "num_labeled": 1, "seed": s, "used": True, "val_dice_best": v}
           for m, s, v in (("random/batch_norm@improved", 0, 0.40), ("random/batch_norm@improved", 1, 0.20),
                           ("gcl@improved", 0, 0.45), ("gcl@improved", 1, 0.25), ("random@improved", 0, 0.5))]
    lines = format_validation(val, rows, "acdc").splitlines()
    assert "| random/batch_norm@improved | 1 | 0.300 ± 0.100 (2) | (reference) | – |" in lines
    assert "| gcl@improved | 1 | 0.350 ± 0.100 (2) | random/batch_norm@improved | +0.050 ± 0.000 (2) |" in lines


# ------------------------------------------------------------------------------------------------
# dice_vs_L.png with fifteen rows (issue 20 item 7): keys outside the axes, a colour per method, a style per recipe
# ------------------------------------------------------------------------------------------------

FIFTEEN = ["random", "gcl", "gcl/no_mitigator", "gcl/no_filter", "gcl+mean_teacher", "simclr", "spcl", "glcl", "macl",
           "ideal", "random@improved", "gcl@improved", "simclr@improved", "random@improved_slow_encoder",
           "gcl@improved_slow_encoder"]  # fmt: skip
FIFTEEN_METHODS = ["random", "gcl", "gcl/no_mitigator", "gcl/no_filter", "gcl+mean_teacher", "simclr", "spcl", "glcl",
                   "macl", "ideal"]  # fmt: skip
FIFTEEN_L = (1, 2, 8)


def _fifteen_dice(method: str, num_labeled: int, seed: int) -> float:
    return round(0.30 + 0.02 * FIFTEEN.index(method) + 0.05 * FIFTEEN_L.index(num_labeled) + 0.01 * seed, 4)


@pytest.fixture(scope="module")
def fifteen(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fifteen rows (ten methods, three recipes) x L = 1, 2, 8 x two seeds of evaluate runs in a real store."""
    out_dir = tmp_path_factory.mktemp("fifteen")
    for method in FIFTEEN:
        for num in FIFTEEN_L:
            for seed in (0, 1):
                _log(out_dir, method, num, seed, (_fifteen_dice(method, num, seed), 5.0, 1.0)).end()
    paths = write_results("", "acdc", out_dir / "results", FIFTEEN, FIFTEEN_L, output_dir=out_dir)
    return {"store": out_dir, "paths": paths}


def test_dice_plot_of_fifteen_rows_keys_methods_by_colour_and_recipes_by_style(fifteen: dict) -> None:
    from matplotlib.colors import to_rgba

    from metacontrast.reporting.dice_plot import DPI, dice_figure, recipe_styles
    from metacontrast.reporting.figures import pyplot
    from metacontrast.reporting.results import collect_evaluate_runs
    from metacontrast.reporting.tables import aggregate

    agg = aggregate(collect_evaluate_runs("", "acdc", FIFTEEN, output_dir=fifteen["store"]))
    fig = dice_figure(agg, "acdc", FIFTEEN, FIFTEEN_L)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        width, height = fig.get_size_inches() * DPI
        # the PNG write_results wrote is this figure
        png = fifteen["paths"]["plot"].read_bytes()
        assert png.startswith(b"\x89PNG") and (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (round(width), round(height))

        (ax,) = fig.axes
        keys = {key.get_title().get_text(): key for key in fig.legends}
        assert set(keys) == {"method", "recipe"}
        method_key, recipe_key = keys["method"], keys["recipe"]
        assert [t.get_text() for t in method_key.get_texts()] == FIFTEEN_METHODS  # one entry per method, in row order
        assert [t.get_text() for t in recipe_key.get_texts()] == ["paper", "improved", "improved_slow_encoder"]
        colour = {t.get_text(): to_rgba(h.get_color()) for t, h in zip(method_key.get_texts(), method_key.legend_handles)}
        style = {t.get_text(): h.get_linestyle() for t, h in zip(recipe_key.get_texts(), recipe_key.legend_handles)}
        assert len(set(colour.values())) == len(FIFTEEN_METHODS) and len(set(style.values())) == 3
        assert style["paper"] == "-"

        # every row is drawn in its method's colour and its recipe's style, through the logged means
        assert [c.get_label() for c in ax.containers] == FIFTEEN
        xs = {}
        for container in ax.containers:
            row = container.get_label()
            method, _, recipe = row.partition("@")
            line = container.lines[0]
            assert to_rgba(line.get_color()) == colour[method], row
            assert line.get_linestyle() == style[recipe or "paper"], row
            assert line.get_ydata() == pytest.approx([np.mean([_fifteen_dice(row, n, s) for s in (0, 1)]) for n in FIFTEEN_L])
            assert np.round(np.log2(np.asarray(line.get_xdata(), dtype=float))).tolist() == [0, 1, 3]  # each point near its L ...
            xs[row] = [float(x) for x in line.get_xdata()]
        for i in range(len(FIFTEEN_L)):  # ... and no two rows' error bars on one vertical
            assert len({round(x[i], 9) for x in xs.values()}) == len(FIFTEEN)

        # the keys stand right of the axes, inside the figure, apart from each other, in readable type
        axes_box = ax.get_window_extent(renderer)
        boxes = [key.get_window_extent(renderer) for key in (method_key, recipe_key)]
        for box in boxes:
            assert box.x0 >= axes_box.x1 and not box.overlaps(axes_box)
            assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height
        assert not boxes[0].overlaps(boxes[1])
        assert min(t.get_fontsize() for t in [*method_key.get_texts(), *recipe_key.get_texts()]) >= 8
        labels = ax.get_tightbbox(renderer)  # tick labels, axis labels and title are not cut off
        assert 0 <= labels.x0 and labels.x1 <= width and 0 <= labels.y0 and labels.y1 <= height
        assert axes_box.width >= 5.5 * DPI and axes_box.height >= 3.5 * DPI  # more room than the five-row plot
    finally:
        pyplot().close(fig)
    # a row with no recipe and the same row '@paper' are the paper's recipe alike
    assert recipe_styles(["gcl@improved", "gcl", "gcl@paper"]) == {"paper": "-", "improved": "--"}


def test_a_variant_without_its_full_method_is_compared_with_random_init():
    """A recipe row (a variant of GCL) whose full method did not run is a row of its own: its gain is over random
    init of its network, not an empty cell against the absent full method; with the full method present it is an
    ablation again."""
    from metacontrast.reporting.papers import format_gains

    rows = _rows({("random/batch_norm@improved", 1, 0): 0.20, ("gcl/recipe@improved", 1, 0): 0.26})
    for row in rows:
        row["norm"] = "batch"
    assert "| gcl/recipe@improved | random/batch_norm@improved | +0.060 ± 0.000 (1) |" in format_gains(rows, "acdc").splitlines()
    rows += [{**rows[-1], "method": "gcl@improved", "test_dice_mean": 0.25}]
    assert "| gcl/recipe@improved | gcl@improved | +0.010 ± 0.000 (1) |" in format_gains(rows, "acdc").splitlines()
