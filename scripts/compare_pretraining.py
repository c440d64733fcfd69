"""Image-wise pre-training losses of the same methods under several settings (one MLflow store each) against chance.

    python scripts/compare_pretraining.py --dataset acdc --methods "['gcl','simclr']" \
        --labels "['grid (lr 0.1)','lr 0.01']" \
        --stores "['sqlite:///runs/acdc/mlruns.db','sqlite:///runs_lr001/acdc/mlruns.db']" \
        --output results/acdc/pretrain_screen.md
"""

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from metacontrast.io import atomic_write_text  # noqa: E402
from metacontrast.layout import RunLayout  # noqa: E402
from metacontrast.reporting.compare import compare_pretraining  # noqa: E402
from metacontrast.reporting.grid import method_names  # noqa: E402


def main(dataset: str, stores: Sequence[str], labels: Sequence[str], methods: str | Sequence[str] = ("gcl",),
         output: str = "", experiment_name: str = "") -> str:
    if len(stores) != len(labels):
        raise ValueError(f"{len(stores)} stores but {len(labels)} labels; give one label per store")
    text = compare_pretraining(dataset, list(zip(map(str, labels), map(str, stores))), method_names(methods),
                               experiment_name=experiment_name or RunLayout("runs", dataset).experiment_name)
    if output:
        atomic_write_text(output, text)
    return text


if __name__ == "__main__":
    fire.Fire(main)
