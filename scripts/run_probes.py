"""Representation probes of several encoders into one MLflow store, then ``results/<dataset>/probes.md``.

    python scripts/run_probes.py --dataset acdc --dataset_dir /data/ACDC/training \
        --methods '[random,gcl,simclr]' --seeds '[0,1,2]' --overrides '{num_threads: 1}'

A method is a pre-training under ``runs/<dataset>/<method>/pretrain/encoder.pt``, a path to an ``encoder.pt``,
or ``name=path``; ``random`` is the seeded random encoder, the reference row.  Rerunning skips every probe
already FINISHED in the store (default: the results grid's, ``runs/<dataset>/mlruns.db``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from metacontrast.reporting.probe_grid import run_probes  # noqa: E402

if __name__ == "__main__":
    fire.Fire(run_probes)
