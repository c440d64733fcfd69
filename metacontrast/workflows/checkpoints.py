"""Loading checkpoints safely: weights-only deserialisation everywhere.

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; a file whose unpickling
would import or call anything else is refused, so a crafted checkpoint cannot run code.  Every error
names the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nets.unet import SegmentationUNet, load_pretrained


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be loaded as weights only (possibly crafted to run code) or is corrupt."""


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"checkpoint {path} was refused: it is not a weights-only file (its unpickling would need: {str(err).splitlines()[0][:200]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UnsafeCheckpointError(f"checkpoint {path} is truncated or corrupt: {err}") from None


def state_dict_of(checkpoint: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``{"state_dict": ...}``, ``{"model": ...}`` or a bare state dict."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                return checkpoint[key]
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise UnsafeCheckpointError(f"checkpoint {path} holds no state dict")


def initialise_encoder(network: SegmentationUNet, pretrained_ckpt: str, freeze_encoder: bool = False) -> list[str]:
    """Load a pre-training output (encoder, maybe decoder blocks) into the segmentation U-Net.

    Empty ``pretrained_ckpt`` keeps the random initialisation (the baseline).  ``freeze_encoder`` stops
    gradients to the encoder blocks (the paper's "frozen encoder" ablation).  Returns the loaded keys.
    """
    loaded: list[str] = []
    if pretrained_ckpt:
        loaded = load_pretrained(network, state_dict_of(load_checkpoint(pretrained_ckpt), pretrained_ckpt), source=f"pretrained checkpoint {pretrained_ckpt}")
    if freeze_encoder:
        network.freeze_encoder()
    return loaded
