"""Projection heads (GCL Sec. 4.2 "Model Details": 1x1 conv, ReLU, 1x1 conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Sequential):
    """Per-pixel MLP: (B, in, h, w) -> (B, out, h, w) through 1x1 conv, ReLU, 1x1 conv.

    GCL uses two of these on the deepest encoder features: ``h_img`` (512->512->128, then global
    average pooling for the image-wise loss, Eq. 1) and ``h_pix`` (same design, kept per pixel for
    Eq. 5).  SimCLR-style heads are the same module followed by pooling.
    """

    def __init__(self, in_channels: int = 512, hidden_channels: int = 512, out_channels: int = 128) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, kernel_size=1),
        )


def pooled_embedding(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pooling then L2 normalisation: (B, D, h, w) -> (B, D) unit vectors."""
    return F.normalize(feature_map.mean(dim=(2, 3)), dim=1)


class EncoderWithHeads(nn.Module):
    """An encoder followed by named projection heads on its deepest features.

    ``forward(x)`` returns ``{name: head(encoder(x))}``, each (B, out, h, w).  Pre-training
    methods compose their network from this and :class:`~metacontrast.nets.unet.UNetEncoder`.
    """

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(x)
        return {name: head(features) for name, head in self.heads.items()}
