"""The end of a fine-tuning run: which checkpoint is the result, what is logged, where it is."""

from __future__ import annotations

import shutil
from pathlib import Path

from .tracking import TrackingRun


def finalise_finetune(tracking: TrackingRun, output_dir: str, has_validation: bool) -> Path:
    """Make ``model.pt`` the run's result, log it as an artifact, end the MLflow run, print a summary.

    With a ``val`` split, ``model.pt`` is the best checkpoint by validation Dice (written by the
    validator's ``FiniteCheckpointSaver``); without one it is the final weights.  Neither is ever a model
    with non-finite weights: with no finite model to show, the run is marked FAILED and this raises.
    """
    output = Path(output_dir)
    best, final = output / "model.pt", output / "model_final.pt"
    if not has_validation or not best.exists():
        if not final.exists():
            tracking.end("FAILED")
            raise RuntimeError(
                f"fine-tuning in {output} produced no usable model: {final.name} was not written because the network's "
                f"weights or predictions were not finite (see the log), and there is no best-by-validation {best.name}"
            )
        shutil.copyfile(final, best)
    tracking.log_artifact(best)
    tracking.end()
    selection = "best validation Dice" if has_validation else "final weights (no val split)"
    print(f"finetune finished: {best} ({selection}); MLflow run {tracking.run_id} in {tracking.tracking_uri}")
    return best
