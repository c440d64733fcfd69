"""Pre-training pieces a config would otherwise write as a long ``$`` expression: GLCL's views, its global
stage's parameters and its local head, and the end of a run (what is logged, where the encoder is)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..data.augment import BatchAugmentation
from ..nets.heads import EncoderWithHeads
from ..layout import ENCODER_FILE
from ..tracking import TrackingRun

Views = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def global_views(augment: BatchAugmentation, strategy: str) -> Views:
    """GLCL's global-stage batch (Sec. 3.2): two augmented views ``(x~, x^)`` of each slice for ``GR``, and the
    untransformed slice first, ``(x, x~, x^)``, for ``GD-`` and ``GD``, whose positives include it."""
    if strategy == "GR":
        return augment.two_views
    return lambda images: (images, *augment.two_views(images))


def intensity_views(local_augment: BatchAugmentation, generator: torch.Generator | None) -> Views:
    """GLCL's local-stage batch (Sec. 3.3): two intensity-only views of each slice, so that a region of one
    view sees the same place as that region of the other; drawn from ``generator`` (the run's augmentation
    generator, whose state the training checkpoints keep)."""
    return lambda images: tuple(local_augment.intensity(images, generator=generator) for _ in range(2))


def global_stage_parameters(network: EncoderWithHeads) -> list[nn.Parameter]:
    """What GLCL's global stage trains: the encoder blocks ``e`` and the heads ``g_1`` (the decoder blocks the
    encoder keeps for the local stage are left to it)."""
    modules = [*network.encoder.encoder_blocks(), network.heads]
    return [p for module in modules for p in module.parameters()]


def local_head(mlp: nn.Module, channels: int, region_projection: int, region_size: int) -> nn.Module:
    """GLCL's ``g_2``: ``mlp`` on the decoder features, then, when ``region_projection`` > 0, a bias-free
    ``region_size`` x ``region_size`` convolution to ``region_projection`` channels, which maps each flattened
    region to one vector as the authors' code does (the loss then takes regions of size 1)."""
    if region_projection <= 0:
        return mlp
    return nn.Sequential(mlp, nn.Conv2d(channels, region_projection, region_size, bias=False))


def finalise_pretrain(tracking: TrackingRun, output_dir: str | Path) -> Path:
    """Log the pre-trained encoder (``<output_dir>/encoder.pt``, :data:`~metacontrast.layout.ENCODER_FILE`) as an
    artifact, end the MLflow run, print where both are; returns the encoder's path."""
    encoder = Path(output_dir) / ENCODER_FILE
    tracking.log_artifact(encoder)
    tracking.end()
    print(f"pretrain finished: encoder {encoder}, MLflow run {tracking.run_id} in {tracking.tracking_uri}")
    return encoder
