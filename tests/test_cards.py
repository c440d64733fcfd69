"""Model cards quote the results tables through scripts/write_cards.py (metacontrast/reporting/cards.py)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from metacontrast.reporting.cards import BEGIN, END, card_rows, write_card_results
from metacontrast.reporting.results import CSV_COLUMNS

CARD = f"# GCL\n\nIntro.\n\n## Results\n\nSee the tables.\n\n{BEGIN}\nstale\n{END}\n\n## Figures\n\nkept\n"


def _write_csv(path: Path, dice: dict[tuple[str, int, int], float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for (method, num, seed), value in dice.items():
            writer.writerow({"run_id": f"{method}{num}{seed}", "run_name": "", "method": method, "dataset": path.parent.name,
                             "num_labeled": num, "seed": seed, "config_hash": "h", "used": True,
                             "test_dice_mean": value, "test_hd95_mean": 5.0, "test_asd_mean": 1.0})


def _row(text: str, method: str) -> list[str]:
    return next(line for line in text.splitlines() if line.startswith(f"| {method} |")).strip("| ").split(" | ")


def test_card_block_holds_the_bundles_rows_beside_random_init_of_the_same_recipe(tmp_path: Path) -> None:
    _write_csv(tmp_path / "results" / "acdc" / "evaluate_runs.csv", {
        ("random", 1, 0): 0.2, ("random", 1, 1): 0.4, ("gcl", 1, 0): 0.5, ("gcl", 1, 1): 0.7,
        ("random@improved", 1, 0): 0.3, ("gcl@improved", 1, 0): 0.6, ("gcl/naive_sum", 1, 0): 0.1, ("spcl", 1, 0): 0.9,
    })
    card = tmp_path / "card.md"
    card.write_text(CARD)
    write_card_results(card, "gcl", tmp_path / "results")
    text = card.read_text()
    assert text.startswith("# GCL\n\nIntro.\n\n## Results\n\nSee the tables.\n\n" + BEGIN) and text.endswith(END + "\n\n## Figures\n\nkept\n")
    assert "stale" not in text and "| spcl |" not in text
    methods = [line.split(" | ")[0][2:] for line in text.splitlines() if line.startswith("| ") and " ± " in line]
    assert methods == ["random", "gcl", "gcl/naive_sum", "random@improved", "gcl@improved"]
    assert _row(text, "gcl")[1] == "0.600 ± 0.100" and _row(text, "random")[1] == "0.300 ± 0.100"
    assert _row(text, "gcl@improved")[-1] == "1"
    before = card.read_bytes()
    write_card_results(card, "gcl", tmp_path / "results")
    assert card.read_bytes() == before  # same results, same bytes


def test_card_without_markers_is_refused_and_left_alone(tmp_path: Path) -> None:
    card = tmp_path / "card.md"
    card.write_text("# MACL\n\n## Results\n")
    with pytest.raises(ValueError, match=r"card\.md: needs exactly one '<!-- results:begin -->'"):
        write_card_results(card, "macl", tmp_path)
    assert card.read_text() == "# MACL\n\n## Results\n"


def test_method_without_runs_says_so(tmp_path: Path) -> None:
    _write_csv(tmp_path / "acdc" / "evaluate_runs.csv", {("random", 1, 0): 0.2})
    card = tmp_path / "card.md"
    card.write_text(CARD)
    write_card_results(card, "macl", tmp_path)
    assert "No finished runs of this method in the results yet." in card.read_text()
    assert card_rows({"random", "random@improved", "macl@improved"}, "macl") == ["random@improved", "macl@improved"]
    # a batch-norm GCL is shown beside random init of both networks
    assert card_rows({"random@improved", "random/batch_norm@improved", "random/batch_norm", "gcl@improved"}, "gcl") == [
        "random@improved", "random/batch_norm@improved", "gcl@improved"]


def test_committed_cards_match_the_committed_results(repo_root: Path, tmp_path: Path) -> None:
    """Regenerating every card from results/ changes nothing: run scripts/write_cards.py after the grid."""
    (tmp_path / "results").symlink_to(repo_root / "results")  # the same relative links as in the repository
    for card in sorted((repo_root / "bundles").glob("*/docs/README.md")):
        bundle = card.parent.parent.name
        if bundle == "common":  # the shared workflows' page, no model card (scripts/write_cards.py skips it too)
            continue
        copy = tmp_path / "bundles" / bundle / "docs" / "README.md"
        copy.parent.mkdir(parents=True)
        shutil.copy(card, copy)
        write_card_results(copy, bundle, tmp_path / "results")
        assert copy.read_text() == card.read_text(), f"{card} is out of date: run scripts/write_cards.py"


def test_summary_block_gives_gains_over_random_and_over_the_full_method(tmp_path: Path) -> None:
    from metacontrast.reporting.cards import write_summary

    _write_csv(tmp_path / "acdc" / "evaluate_runs.csv", {
        ("random@improved", 1, 0): 0.2, ("random@improved", 1, 1): 0.4, ("gcl@improved", 1, 0): 0.3, ("gcl@improved", 1, 1): 0.6,
        ("gcl/no_filter@improved", 1, 0): 0.25, ("gcl/no_filter@improved", 1, 1): 0.5,
    })
    readme = tmp_path / "README.md"
    readme.write_text(f"# Results\n\n{BEGIN}\nstale\n{END}\n\nreading\n")
    write_summary(readme, tmp_path)
    text = readme.read_text()
    assert text.endswith(f"{END}\n\nreading\n") and "stale" not in text
    assert _row(text, "random@improved")[1:] == ["(test Dice)", "0.300 ± 0.100"]
    assert _row(text, "gcl@improved")[1:] == ["random@improved", "+0.150 ± 0.050 (2)"]
    assert _row(text, "gcl/no_filter@improved")[1:] == ["gcl@improved", "-0.075 ± 0.025 (2)"]


def test_committed_results_readme_matches_the_committed_results(repo_root: Path, tmp_path: Path) -> None:
    from metacontrast.reporting.cards import write_summary

    copy = tmp_path / "README.md"
    shutil.copy(repo_root / "results" / "README.md", copy)
    write_summary(copy, repo_root / "results")
    assert copy.read_text() == (repo_root / "results" / "README.md").read_text(), "run scripts/write_cards.py"


def test_write_cards_on_a_results_folder_without_the_summary_page(repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``scripts/write_cards.py --results_dir`` a grid's own results folder (no ``README.md``): the cards are
    written and the missing summary page is named, not a ``FileNotFoundError``."""
    import runpy

    main = runpy.run_path(str(repo_root / "scripts" / "write_cards.py"))["main"]
    _write_csv(tmp_path / "results" / "sample" / "evaluate_runs.csv", {("random", 1, 0): 0.2, ("gcl", 1, 0): 0.5})
    card = tmp_path / "bundles" / "gcl" / "docs" / "README.md"
    card.parent.mkdir(parents=True)
    card.write_text(CARD)
    main(results_dir=str(tmp_path / "results"), bundles_dir=str(tmp_path / "bundles"))
    assert _row(card.read_text(), "gcl")[1] == "0.500 ± 0.000"
    assert not (tmp_path / "results" / "README.md").exists()
    assert "README.md: no such file, so no summary block was written" in capsys.readouterr().out
