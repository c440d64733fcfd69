"""Fine-tuning pieces the config does not say in one line: the optimiser's parameter groups, the validation
handler (when there is a ``val`` split), and the end of a run (which checkpoint is the result, what is logged,
where it is)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from monai.handlers import ValidationHandler
from torch import nn

from ..nets.unet import SegmentationUNet
from ..ranks import is_leader
from ..tracking import TrackingRun


def parameter_groups(network: SegmentationUNet, learning_rate: float, encoder_lr_scale: float = 1.0) -> list[Any]:
    """The trainable parameters for the optimiser: the encoder blocks at ``learning_rate * encoder_lr_scale``,
    everything else (decoder, output layer) at ``learning_rate``.

    ``encoder_lr_scale`` 1.0 gives one plain list, the optimiser of every earlier run.  The encoder is the
    network's structural encoder (:meth:`SegmentationUNet.encoder_blocks`) whatever the initialisation, so
    random init under the same recipe is optimised alike and a method's gain stays a gain of its weights.
    Frozen parameters (``freeze_encoder``) are left out.
    """
    trainable = [p for p in network.parameters() if p.requires_grad]
    if encoder_lr_scale == 1.0:
        return trainable
    encoder = {id(p) for block in network.encoder_blocks() for p in block.parameters()}
    groups = [
        {"params": [p for p in trainable if id(p) in encoder], "lr": learning_rate * encoder_lr_scale},
        {"params": [p for p in trainable if id(p) not in encoder], "lr": learning_rate},
    ]
    return [group for group in groups if group["params"]]


def validation_handlers(validator: Any, interval: int, val_loader: Any) -> list[ValidationHandler]:
    """The trainer's validation: ``validator`` run every ``interval`` epochs (not before the first), or nothing
    when the manifest has no ``val`` volumes (``val_loader`` is ``None``)."""
    if val_loader is None:
        return []
    return [ValidationHandler(validator=validator, interval=interval, epoch_level=True, exec_at_start=False)]


def finalise_finetune(tracking: TrackingRun, output_dir: str, has_validation: bool) -> Path | None:
    """Make ``model.pt`` the run's result, log it as an artifact, end the MLflow run, print a summary.

    In a ``torchrun`` job only rank 0, which wrote the checkpoints, does this; the other ranks return ``None``.

    With a ``val`` split, ``model.pt`` is the best checkpoint by validation Dice (written by the
    validator's ``FiniteCheckpointSaver``); without one it is the final weights.  Neither is ever a model
    with non-finite weights: with no finite model to show, the run is marked FAILED and this raises.
    """
    if not is_leader():
        return None
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
