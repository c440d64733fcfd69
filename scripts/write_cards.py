"""Write the results block of every model card (bundles/<bundle>/docs/README.md) and of results/README.md
from results/*/evaluate_runs.csv.

    python scripts/write_cards.py                      # after scripts/run_grid.py has written results/

Only the text between ``<!-- results:begin -->`` and ``<!-- results:end -->`` changes; see
``metacontrast/reporting/cards.py``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from metacontrast.reporting.cards import write_card_results, write_summary  # noqa: E402


def main(results_dir: str = "results", bundles_dir: str = "bundles") -> None:
    for card in sorted(Path(bundles_dir).glob("*/docs/README.md")):
        if card.parent.parent.name != "common":
            print(write_card_results(card, card.parent.parent.name, results_dir))
    summary = Path(results_dir) / "README.md"
    if summary.is_file():
        print(write_summary(summary, results_dir))
    else:  # a results folder of its own (--results_dir) need not have the repository's summary page
        print(f"{summary}: no such file, so no summary block was written (the model cards were)")


if __name__ == "__main__":
    fire.Fire(main)
