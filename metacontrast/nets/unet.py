"""The 2D U-Net shared by every method, split so that pre-training can use the encoder alone.

MONAI's :class:`~monai.networks.nets.BasicUNet` is the segmentation network (``features`` gives the
widths of ``conv_0, down_1 .. down_4`` and the last decoder block).  Pre-training needs the encoder
without the decoder, and some methods (GLCL, MACL) the first decoder blocks too, which ``BasicUNet``
only offers through its monolithic ``forward``; :class:`SegmentationUNet` adds ``encode`` and
``decode`` so every method uses the same modules under the same state-dict names.  A pre-training
checkpoint is therefore a subset of the fine-tune network's state dict and loads with
:func:`load_pretrained`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets import BasicUNet
from torch import nn

ENCODER_BLOCKS = ("conv_0", "down_1", "down_2", "down_3", "down_4")
DECODER_BLOCKS = ("upcat_4", "upcat_3", "upcat_2", "upcat_1")


class SegmentationUNet(BasicUNet):
    """``BasicUNet`` (2D by default) with the encoder and decoder exposed separately.

    Args:
        in_channels: image channels.
        out_channels: number of classes including background.
        features: six widths, ``(conv_0, down_1, down_2, down_3, down_4, upcat_1)``; the paper-scale
            network is ``(32, 64, 128, 256, 512, 32)`` (deepest features 512).
        spatial_dims: 2 for slice-wise training.
        kwargs: passed to ``BasicUNet`` (``act``, ``norm``, ``dropout``, ``upsample``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        features: Sequence[int] = (32, 64, 128, 256, 512, 32),
        spatial_dims: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, tuple(features), **kwargs)
        self.features = tuple(features)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` (B, C, H, W) -> the five encoder outputs; the last is (B, features[4], H/16, W/16)."""
        feats = [self.conv_0(x)]
        for name in ENCODER_BLOCKS[1:]:
            feats.append(getattr(self, name)(feats[-1]))
        return feats

    def decode(self, feats: Sequence[torch.Tensor], num_blocks: int = 4) -> torch.Tensor:
        """Run the first ``num_blocks`` decoder blocks on ``encode``'s output.

        Returns the feature map after block ``num_blocks``: for 4 this is the last decoder layer
        (B, features[5], H, W) before ``final_conv``; for ``l < 4`` it is at 1/2**(4-l) resolution.
        """
        x = feats[-1]
        for block_name, skip in zip(DECODER_BLOCKS[:num_blocks], reversed(feats[:-1])):
            x = getattr(self, block_name)(x, skip)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W) -> logits (B, out_channels, H, W)."""
        return self.final_conv(self.decode(self.encode(x)))

    def encoder_modules(self) -> list[nn.Module]:
        return [getattr(self, name) for name in ENCODER_BLOCKS]

    def decoder_modules(self, num_blocks: int = 4) -> list[nn.Module]:
        return [getattr(self, name) for name in DECODER_BLOCKS[:num_blocks]]


class UNetEncoder(nn.Module):
    """The encoder half of :class:`SegmentationUNet`, under the same state-dict names.

    Built by constructing the full network and keeping only the encoder blocks, so the two can
    never drift apart.  ``forward`` returns the deepest feature map (B, features[4], H/16, W/16);
    ``encode`` returns all five levels.
    """

    def __init__(self, in_channels: int = 1, features: Sequence[int] = (32, 64, 128, 256, 512, 32), **kwargs) -> None:
        super().__init__()
        full = SegmentationUNet(in_channels=in_channels, out_channels=1, features=features, **kwargs)
        for name in ENCODER_BLOCKS:
            self.add_module(name, getattr(full, name))
        self.out_channels = int(features[4])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return SegmentationUNet.encode(self, x)  # same module names, same computation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[-1]


def encoder_state_dict(module: nn.Module, extra_prefixes: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The encoder (and any ``extra_prefixes``, e.g. decoder blocks) of a module, keyed as in the U-Net.

    ``module`` may be a :class:`SegmentationUNet`, a :class:`UNetEncoder`, or a wrapper holding one
    as ``.encoder`` / ``.unet``.
    """
    inner = getattr(module, "unet", None) or getattr(module, "encoder", None) or module
    keep = tuple(ENCODER_BLOCKS) + tuple(extra_prefixes)
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if k.split(".")[0] in keep}


class PretrainedWeightsMismatch(ValueError):
    """A pre-trained checkpoint does not fit the network it is loaded into."""


def load_pretrained(network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
    """Copy a pre-trained subset (encoder, maybe decoder blocks) into ``network``.

    Every key of ``state_dict`` must exist in ``network`` with the same shape; otherwise a
    :class:`PretrainedWeightsMismatch` names the first offending keys.  Returns the loaded keys.
    """
    own = network.state_dict()
    missing = [k for k in state_dict if k not in own]
    wrong = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in state_dict if k in own and own[k].shape != state_dict[k].shape]
    if missing or wrong or not state_dict:
        detail = "; ".join((missing + wrong)[:5]) or "it holds no weights"
        raise PretrainedWeightsMismatch(f"{source} does not match the network ({len(missing)} unknown keys, {len(wrong)} shape mismatches): {detail}")
    network.load_state_dict(dict(state_dict), strict=False)
    return sorted(state_dict)
