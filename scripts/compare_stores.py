"""Compare the same grid rows in two MLflow stores (one setting changed between them), paired by seed.

    python scripts/compare_stores.py --dataset acdc --store_a sqlite:///runs/acdc/mlruns.db \
        --store_b sqlite:///runs240/acdc/mlruns.db --methods "['gcl@improved']" \
        --labels "['80 its','240 its']" --output results/acdc/pretrain_length.md
"""

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from metacontrast.io import atomic_write_text  # noqa: E402
from metacontrast.layout import RunLayout  # noqa: E402
from metacontrast.reporting.compare import compare_stores  # noqa: E402
from metacontrast.reporting.grid import method_names  # noqa: E402


def main(dataset: str, store_a: str, store_b: str, methods: str | Sequence[str], labels: Sequence[str] = ("A", "B"),
         output: str = "", experiment_name: str = "") -> str:
    text = compare_stores(dataset, store_a, store_b, method_names(methods), (str(labels[0]), str(labels[1])),
                          experiment_name or RunLayout("runs", dataset).experiment_name)
    if output:
        atomic_write_text(output, text)
    return text


if __name__ == "__main__":
    fire.Fire(main)
