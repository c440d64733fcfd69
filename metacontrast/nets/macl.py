"""MACL's asymmetric two-branch network (Zeng et al., "Multi-level Asymmetric Contrastive Learning for
Medical Image Segmentation Pre-training"; the paper calls the method JCL in its equations).

One U-Net encoder ``e``, shared by two branches (Sec. 3.2, Fig. 2):

* **auxiliary** branch: ``Y~ = e(aug(X))`` (Eq. 5), then an instance projector and a pixel projector,
  ``Z~^g = g~_ins(Y~)``, ``Z~^l = g~_pix(Y~)`` (Eq. 6); no decoder;
* **dominant** branch: ``Y = e(down(aug(X)))`` (Eq. 7) on a 0.25x downsampled copy of the *same*
  augmented image, then the first two decoder blocks ``d`` and its own projectors,
  ``Z^g = g_ins(d(Y))``, ``Z^l = g_pix(d(Y))`` (Eq. 8).

With the encoder at 1/16 and two up blocks (x4), ``d(Y)`` has the spatial size of ``Y~``: the pixel
projections of the two branches correspond location by location (Eq. 11), and ``Y`` has the size of
``down(Y~)`` (Eq. 12).  Because of the 0.25x downsampling and the 16x encoder the input side must be a
multiple of 64, and at least 128 so the dominant encoder's deepest map keeps more than one pixel (instance
norm needs it); other sizes are zero-padded to the next such size (:func:`pad_to_multiple`) -- the same
zero padding the slice preprocessing already applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNetEncoder


def downsample(x: torch.Tensor, scale_factor: float = 0.25, mode: str = "area") -> torch.Tensor:
    """The paper's ``down(.)``: (B, C, H, W) -> (B, C, H s, W s).

    ``mode="area"`` averages each (1/s x 1/s) block -- aligned with the encoder's stride-2 grid and free of
    aliasing; any other ``F.interpolate`` mode (``"bilinear"``, ...) is accepted (``align_corners=False``).
    """
    size = [round(d * scale_factor) for d in x.shape[2:]]
    if mode in ("nearest", "area", "nearest-exact"):
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def pad_to_multiple(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    """Zero-pad (B, C, H, W) symmetrically (the odd pixel at the end) so H and W are multiples of
    ``multiple`` and at least ``minimum``; returned unchanged when they already are."""
    pads = []
    for size in reversed(x.shape[2:]):  # F.pad wants the last dim first
        target = max(math.ceil(size / multiple) * multiple, minimum)
        pads += [(target - size) // 2, target - size - (target - size) // 2]
    return F.pad(x, pads) if any(pads) else x


class PixelProjector(nn.Sequential):
    """MACL's pixel-level projector (Appendix A): (B, in, h, w) -> (B, out, h, w) through
    ``Conv3x3 -> BatchNorm -> LeakyReLU -> Conv3x3 -> BatchNorm -> LeakyReLU``."""

    def __init__(self, in_channels: int, hidden_channels: int = 128, out_channels: int = 128) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(hidden_channels),
            nn.LeakyReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(inplace=True),
        )


class MACLNetwork(nn.Module):
    """The shared encoder, the dominant branch's partial decoder and the projectors of both branches.

    Args:
        encoder: a :class:`~metacontrast.nets.unet.UNetEncoder` keeping at least ``num_decoder_blocks`` up
            blocks; its encoder and those blocks are what fine-tuning loads.
        auxiliary_heads: projectors on ``Y~`` (``features[-1]`` channels at 1/16), e.g.
            ``{"instance": PooledProjectionHead(...), "pixel": PixelProjector(...)}``.
        dominant_heads: projectors on ``d(Y)`` (``features[-2 - num_decoder_blocks]`` channels).
        num_decoder_blocks: up blocks in the dominant branch (2 in the paper).
        scale_factor: the dominant branch's downsampling (0.25; ``2 ** -num_decoder_blocks`` keeps the
            branches aligned).
        downsample_mode: see :func:`downsample`.
        auxiliary_suffix: appended to an auxiliary head's name in the output (``"_aux"``; GCL's dominant-branch
            variant passes ``""`` so its image heads keep the names :class:`~metacontrast.losses.GCLLoss` reads).

    ``forward(x)`` with ``x`` (B, 1, H, W) returns a dict: ``features`` = ``Y`` and ``features_aux`` = ``Y~``
    (the encoder's deepest maps), and for each head name ``k``, ``k`` = ``g_k(d(Y))`` and ``k + auxiliary_suffix`` =
    ``g~_k(Y~)``.  At 192 x 192 with the default widths: ``Y~`` (B, 512, 12, 12), ``Y`` (B, 512, 3, 3),
    ``d(Y)`` (B, 64, 12, 12).
    """

    def __init__(self, encoder: UNetEncoder, auxiliary_heads: Mapping[str, nn.Module], dominant_heads: Mapping[str, nn.Module],
                 num_decoder_blocks: int = 2, scale_factor: float = 0.25, downsample_mode: str = "area",
                 auxiliary_suffix: str = "_aux") -> None:
        super().__init__()
        kept = int(getattr(encoder, "kept_decoder_blocks", 0))
        if not 1 <= num_decoder_blocks <= kept:
            raise ValueError(f"num_decoder_blocks must be in 1..{kept} (the up blocks the encoder keeps), got {num_decoder_blocks}")
        if not math.isclose(scale_factor * 2**num_decoder_blocks, 1.0):
            raise ValueError(f"scale_factor {scale_factor} does not align the branches: "
                             f"{num_decoder_blocks} up blocks need {2.0 ** -num_decoder_blocks}")
        self.encoder = encoder
        self.auxiliary_heads = nn.ModuleDict(dict(auxiliary_heads))
        self.dominant_heads = nn.ModuleDict(dict(dominant_heads))
        self.num_decoder_blocks = int(num_decoder_blocks)
        self.scale_factor = float(scale_factor)
        self.downsample_mode = downsample_mode
        self.auxiliary_suffix = auxiliary_suffix
        if set(auxiliary_heads) & set(dominant_heads) and not auxiliary_suffix:
            raise ValueError(f"heads {sorted(set(auxiliary_heads) & set(dominant_heads))} are in both branches: give an auxiliary_suffix")
        self.input_multiple = round(2 ** (len(encoder.encoder_blocks()) - 1) / scale_factor)  # 16 / 0.25 = 64

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = pad_to_multiple(x, self.input_multiple, minimum=2 * self.input_multiple)
        y_aux = self.encoder.encode(x)[-1]  # Eq. 5
        skips = self.encoder.encode(downsample(x, self.scale_factor, self.downsample_mode))  # Eq. 7
        decoded = self.encoder.decode(skips, self.num_decoder_blocks)
        out = {"features": skips[-1], "features_aux": y_aux}
        out.update({name + self.auxiliary_suffix: head(y_aux) for name, head in self.auxiliary_heads.items()})  # Eq. 6
        out.update({name: head(decoded) for name, head in self.dominant_heads.items()})  # Eq. 8
        return out
