"""Projection heads (GCL Sec. 4.2 "Model Details": 1x1 conv, ReLU, 1x1 conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .macl import MACLNetwork


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


class PooledProjectionHead(nn.Sequential):
    """Global average pooling, then the two-layer MLP: (B, in, h, w) -> (B, out, 1, 1).

    SimCLR's ``g(.)`` (Chen et al. 2020) and SPCL's projector (supplement Sec. 3.2: "an average pooling
    to flatten the output of the encoder followed by a two-layer MLP") pool *before* the MLP; on a 1x1
    map the 1x1 convolutions of :class:`ProjectionHead` are exactly dense layers.
    """

    def __init__(self, in_channels: int = 512, hidden_channels: int = 512, out_channels: int = 128) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), ProjectionHead(in_channels, hidden_channels, out_channels))


def gcl_heads(in_channels: int, hidden_channels: int, out_channels: int, image_labels: list[str] | tuple[str, ...] = (),
              pixel_in_channels: int | None = None) -> dict[str, nn.Module]:
    """GCL's projection heads: ``{"img": h_img, "pix": h_pix}`` (the paper: one image head shared by every meta
    label), or, given ``image_labels``, ``{"pix": h_pix, "img_<m>": h_img^m for each m}``: one image head per meta
    label, so labels whose positives conflict (patient ID's are slice quantile's negatives) need not pull one
    embedding apart.  Every head is a :class:`ProjectionHead` (in -> hidden -> out); ``h_pix`` reads
    ``pixel_in_channels`` (default ``in_channels``) when it sits on decoder features (:func:`gcl_network`)."""
    make = lambda channels: ProjectionHead(channels, hidden_channels, out_channels)  # noqa: E731
    image = {f"img_{m}": make(in_channels) for m in image_labels} if image_labels else {"img": make(in_channels)}
    return {**image, "pix": make(in_channels if pixel_in_channels is None else pixel_in_channels)}


def gcl_network(encoder: nn.Module, heads: dict[str, nn.Module], pixel_decoder_blocks: int = 0,
                downsample_mode: str = "area", pixel_key: str = "pix") -> nn.Module:
    """GCL's pre-training network: the encoder and the heads of :func:`gcl_heads`.

    ``pixel_decoder_blocks = 0`` is the paper (Fig. 2): every head on the deepest encoder features ``f(x)``
    (:class:`EncoderWithHeads`).  With ``l > 0`` the pixel head moves onto MACL's dominant branch
    (:class:`~metacontrast.nets.macl.MACLNetwork`): ``u = h_pix(d_l(f(down(x))))``, the first ``l`` up blocks run on
    the encoder's features of a ``2^-l`` downsampled copy of the same view, so ``u`` (B, D, h, w) lies on the grid of
    ``h_img(f(x))`` and Eq. 6's affinities still come from the image-wise space; the image heads stay on ``f(x)``.
    The pixel-wise term then trains the first ``l`` decoder blocks as well, which fine-tuning loads; ``encoder``
    must keep them (``UNetEncoder(keep_decoder_blocks=l)``).
    """
    if pixel_decoder_blocks == 0:
        return EncoderWithHeads(encoder, heads)
    image_heads = {k: v for k, v in heads.items() if k != pixel_key}
    return MACLNetwork(encoder, image_heads, {pixel_key: heads[pixel_key]}, num_decoder_blocks=pixel_decoder_blocks,
                       scale_factor=2.0 ** -pixel_decoder_blocks, downsample_mode=downsample_mode, auxiliary_suffix="")


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


class DecoderWithHeads(EncoderWithHeads):
    """A U-Net encoder, its first ``num_decoder_blocks`` up blocks and named heads on the last one's output.

    GLCL's local stage (Sec. 3.3-3.4): ``g_2(d_l(e(x)))``.  ``encoder`` is a
    :class:`~metacontrast.nets.unet.UNetEncoder` that keeps at least ``num_decoder_blocks`` up blocks
    (it may be the very object the global stage trained).  With ``freeze_encoder`` the encoder blocks run
    without gradients and in eval mode, and :meth:`trainable_parameters` leaves them out, so the encoder
    is used as the previous stage left it; nothing about it is changed in place.
    """

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module], num_decoder_blocks: int | None = None,
                 freeze_encoder: bool = True) -> None:
        super().__init__(encoder, heads)
        kept = int(getattr(encoder, "kept_decoder_blocks", len(encoder.decoder_blocks())))
        self.num_decoder_blocks = kept if num_decoder_blocks is None else int(num_decoder_blocks)
        if not 1 <= self.num_decoder_blocks <= kept:
            raise ValueError(f"num_decoder_blocks must be in 1..{kept} (the up blocks the encoder keeps), got {self.num_decoder_blocks}")
        self.freeze_encoder = bool(freeze_encoder)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The decoder blocks' and heads' parameters (and the encoder's unless it is frozen)."""
        modules = [*self.encoder.decoder_blocks(self.num_decoder_blocks), self.heads]
        if not self.freeze_encoder:
            modules += self.encoder.encoder_blocks()
        return [p for m in modules for p in m.parameters()]

    def train(self, mode: bool = True) -> DecoderWithHeads:
        super().train(mode)
        if self.freeze_encoder:
            for block in self.encoder.encoder_blocks():
                block.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            skips = self.encoder.encode(x)
        features = self.encoder.decode(skips, self.num_decoder_blocks)
        return {name: head(features) for name, head in self.heads.items()}
