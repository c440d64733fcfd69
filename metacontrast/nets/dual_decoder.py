"""A U-Net with one shared encoder and two decoders, for cross pseudo supervision (IDEAL Sec. 2.3, Fig. 2b).

IDEAL fine-tunes its pre-trained encoder with two decoders "of different architecture initialization":
one upsamples with transposed convolutions, the other with bilinear interpolation.  Here the first
decoder is :class:`~metacontrast.nets.unet.SegmentationUNet`'s own (MONAI's up blocks, transposed
convolutions), so the state-dict names of the encoder and of decoder 1 are those of the plain
segmentation network and a pre-training checkpoint (encoder, maybe decoder blocks) loads unchanged.
The second decoder is the up blocks of another, independently initialised ``SegmentationUNet`` whose
transposed convolutions are replaced by bilinear upsampling followed by a stride-1 convolution of the
same kernel size; its normalisation, activation and residual units are MONAI's, as in decoder 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

from .unet import DEFAULT_CHANNELS, SegmentationUNet

_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def to_interpolating_up_block(block: nn.Module) -> nn.Module:
    """Replace the transposed convolution of a MONAI ``UNet`` up block by upsampling + convolution, in place.

    A MONAI up block is ``Convolution(is_transposed=True, strides=s)`` (then a ``ResidualUnit`` when
    ``num_res_units > 0``); its ``conv`` layer becomes ``Upsample(scale_factor=s, mode=(bi|tri)linear)``
    followed by a stride-1 convolution with the same channels, kernel size and bias, freshly initialised.
    Output shapes are unchanged: (B, C_in, H, W) -> (B, C_out, s H, s W).
    """
    conv = next(m for m in block.modules() if isinstance(m, Convolution))
    transposed = conv.conv
    if not isinstance(transposed, nn.modules.conv._ConvTransposeNd):
        raise TypeError(f"expected a transposed convolution in the up block, found {type(transposed).__name__}")
    dims = transposed.weight.ndim - 2
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    kernel = transposed.kernel_size
    conv.conv = nn.Sequential(
        nn.Upsample(scale_factor=transposed.stride, mode=_INTERPOLATION[dims], align_corners=False),
        conv_type(transposed.in_channels, transposed.out_channels, kernel, stride=1, padding=tuple(k // 2 for k in kernel),
                  bias=transposed.bias is not None),
    )
    return block


class DualDecoderUNet(SegmentationUNet):
    """Shared U-Net encoder, decoder 1 with transposed convolutions, decoder 2 with bilinear upsampling.

    Args: as :class:`~metacontrast.nets.unet.SegmentationUNet`.

    ``forward_both(x)``: ``x`` (B, in_channels, H, W) -> ``(logits_1, logits_2)``, each (B, out_channels, H, W).
    ``forward(x)``: the prediction used for validation and evaluation, ``log((softmax(logits_1) +
    softmax(logits_2)) / 2)`` (B, out_channels, H, W): the log of the two decoders' mean class
    probabilities, so a softmax of it is that mean and its argmax is the ensemble's label map.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 4, features: Sequence[int] = DEFAULT_CHANNELS,
                 num_res_units: int = 2, spatial_dims: int = 2, **kwargs) -> None:
        super().__init__(in_channels, out_channels, features, num_res_units, spatial_dims, **kwargs)
        donor = SegmentationUNet(in_channels, out_channels, features, num_res_units, spatial_dims, **kwargs)
        self.bilinear_decoder = nn.ModuleList(to_interpolating_up_block(b) for b in donor.decoder_blocks())

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encode(x)
        return self.decode(feats), self.decode(feats, blocks=self.bilinear_decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack(self.forward_both(x))  # (2, B, C, H, W)
        return torch.logsumexp(torch.log_softmax(logits, dim=2), dim=0) - math.log(2.0)
