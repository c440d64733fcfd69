"""Export a fine-tuned run as a self-contained MONAI Model Zoo bundle (default ``dist/<name>/``).

From an MLflow fine-tune run (its logged settings and ``model.pt``; ``--tracking_uri`` is an MLflow URI,
or the run's output folder for its default local store)::

    python scripts/export_bundle.py --run_id 0123abcd... --tracking_uri runs/acdc/gcl/L1_seed0

From a checkpoint and the settings it was fine-tuned with::

    python scripts/export_bundle.py --ckpt runs/acdc/gcl/L1_seed0/model.pt --dataset acdc --method gcl \\
        --num_labeled 1 --seed 0 --features '[16,32,64,128,256]' \\
        --preprocessing_overrides '{acdc: {pixel_size: [2.734, 2.734], spatial_size: [96, 96]}}'

A fine-tuned ``model.pt`` records its preprocessing and network: the bundle gets those (and its ``models/model.pt``
keeps the record), whatever the manifest is named; ``--pixel_size``, ``--spatial_size``, ``--features`` or
``--preprocessing_overrides`` that differ are refused (``ModelSettingsConflict``) unless
``--allow_preprocessing_override True`` (a warning names both values).

Other options: ``--dest DIR``, ``--name NAME``, ``--version 0.2.0 --changelog "..."``, ``--dataset_dir``
(the data folder the exported configs default to), ``--results_dir`` (``None``: no results rows in the
model card), ``--include_encoder False``, ``--overwrite True``.  The logic is
:func:`metacontrast.export.bundle.export_bundle`; this file only maps the command line onto it.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as `python scripts/export_bundle.py` without install
    sys.path.insert(0, str(REPO_ROOT))

import fire  # noqa: E402

from metacontrast.export.bundle import export_bundle  # noqa: E402

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # export_bundle takes **overrides, so fire would pass --help on as one
        print(__doc__)
        sys.exit(0)
    fire.Fire(export_bundle)
