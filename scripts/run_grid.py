"""Results-table runner: pre-train, fine-tune and evaluate a grid of methods x L x seeds, then tabulate.

    python scripts/run_grid.py --dataset acdc --dataset_dir /data/ACDC/training \
        --methods '[random,gcl]' --labeled '[1,2,8]' --seeds '[0,1,2]'

Rerunning skips every run already FINISHED in the grid's MLflow store.  ``--preset None`` runs at paper scale.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from metacontrast.reporting.grid import run_grid  # noqa: E402

if __name__ == "__main__":
    fire.Fire(run_grid)
