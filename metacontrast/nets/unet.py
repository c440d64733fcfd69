"""The 2D U-Net shared by every method, split so that pre-training can use the encoder alone.

The segmentation network is MONAI's :class:`~monai.networks.nets.UNet` with residual units, e.g.
``UNet(2, 1, 4, channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2), num_res_units=2)``: four
strided down blocks, a bottom block with the deepest features (``channels[-1]`` at 1/16 resolution), and
four up blocks.  MONAI builds it recursively (``Sequential(down, SkipConnection(inner), up)``) and only
offers the whole forward pass; pre-training needs the encoder alone and some methods (GLCL, MACL) the
first decoder blocks too, so :class:`SegmentationUNet` finds the blocks in MONAI's structure and adds
``encode`` / ``decode``.  State-dict names are MONAI's, so a pre-training checkpoint is a subset of the
fine-tune network's state dict and loads with :func:`load_pretrained`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn

DEFAULT_CHANNELS = (32, 64, 128, 256, 512)
#: normalisation layers the U-Net may use: MONAI's default (InstanceNorm, no affine parameters) and BatchNorm
NORMS = ("instance", "batch")


class SegmentationUNet(UNet):
    """MONAI ``UNet`` (2D, residual units) with the encoder and decoder exposed separately.

    Args:
        in_channels: image channels.
        out_channels: number of classes including background.
        features: widths of the four down blocks and the bottom block; the paper-scale network is
            ``(32, 64, 128, 256, 512)`` (deepest features 512), the CPU preset halves them.
        num_res_units: residual units per block (2 as in the project's reference network).
        spatial_dims: 2 for slice-wise training.
        norm: ``"instance"`` (MONAI's default: per-slice, per-channel statistics, no affine parameters, the same
            in training and inference) or ``"batch"`` (statistics over the batch, affine parameters and running
            statistics in the state dict).  Neither GCL paper nor its peers name the layer.
        kwargs: passed to ``UNet`` (``act``, ``dropout``).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 4, features: Sequence[int] = DEFAULT_CHANNELS,
                 num_res_units: int = 2, spatial_dims: int = 2, norm: str = "instance", **kwargs) -> None:
        features = tuple(int(f) for f in features)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        super().__init__(spatial_dims, in_channels, out_channels, channels=features, strides=(2,) * (len(features) - 1),
                         num_res_units=num_res_units, norm=norm, **kwargs)
        self.features = features
        downs, ups = [], []
        block: nn.Module = self.model
        while True:  # Sequential(down, SkipConnection(inner), up), innermost: SkipConnection(bottom)
            downs.append(block[0])
            ups.append(block[2])
            inner = block[1].submodule
            if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
                block = inner
            else:
                bottom = inner
                break
        # kept in a tuple so they are not registered twice: they already are, under MONAI's names
        self._blocks = (downs, bottom, ups[::-1])  # up blocks deepest first

    def encoder_blocks(self) -> list[nn.Module]:
        """Down blocks then the bottom block."""
        downs, bottom, _ = self._blocks
        return [*downs, bottom]

    def decoder_blocks(self, num_blocks: int | None = None) -> list[nn.Module]:
        """Up blocks, deepest first (``decoder_blocks(l)``: the first ``l`` of them)."""
        ups = self._blocks[2]
        return ups[: len(ups) if num_blocks is None else num_blocks]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` (B, C, H, W) -> the outputs of every encoder block; the last is (B, features[-1], H/16, W/16)."""
        feats = []
        for block in self.encoder_blocks():
            x = block(x)
            feats.append(x)
        return feats

    def decode(self, feats: Sequence[torch.Tensor], num_blocks: int | None = None,
               blocks: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """Run the first ``num_blocks`` up blocks (all: the logits (B, out_channels, H, W)) on ``encode``'s output.

        Each up block sees ``cat(skip, deeper)`` as MONAI's ``SkipConnection`` builds it.  ``blocks``
        (deepest first) replaces this network's up blocks, e.g. a second decoder on the same encoder.
        """
        x = feats[-1]
        for block, skip in zip(self.decoder_blocks(num_blocks) if blocks is None else blocks, reversed(feats[:-1])):
            x = block(torch.cat([skip, x], dim=1))
        return x

    def module_keys(self, modules: Sequence[nn.Module]) -> list[str]:
        """State-dict keys of the parameters and buffers that belong to ``modules``."""
        owned = {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}
        keep = {name for name, t in (*self.named_parameters(), *self.named_buffers()) if id(t) in owned}
        return [k for k in self.state_dict() if k in keep]

    def pretrained_state_dict(self, num_decoder_blocks: int = 0) -> dict[str, torch.Tensor]:
        """Encoder weights (and the first ``num_decoder_blocks`` up blocks), keyed as in this network."""
        keys = set(self.module_keys(self.encoder_blocks() + self.decoder_blocks(num_decoder_blocks)))
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in keys}

    def freeze_encoder(self) -> None:
        """Stop gradients to the encoder blocks (so an optimiser built from the parameters that require
        them leaves the encoder out) and keep those blocks in eval mode from now on, whatever ``train()``
        later asks: a batch norm's running statistics and a dropout stay as they were pre-trained."""
        for block in self.encoder_blocks():
            block.requires_grad_(False)
        self._encoder_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> SegmentationUNet:
        """``nn.Module.train``, except that a frozen encoder (:meth:`freeze_encoder`) stays in eval mode."""
        super().train(mode)
        if getattr(self, "_encoder_frozen", False):
            for block in self.encoder_blocks():
                block.train(False)
        return self


class UNetEncoder(SegmentationUNet):
    """The encoder of :class:`SegmentationUNet` under the same state-dict names, without the decoder.

    Built as the full network with the up blocks (and the decoder blocks not listed in
    ``keep_decoder_blocks``) replaced by ``nn.Identity``, so the two can never drift apart and no
    parameter is left without a gradient.  ``forward`` returns the deepest features
    (B, features[-1], H/16, W/16).
    """

    def __init__(self, in_channels: int = 1, features: Sequence[int] = DEFAULT_CHANNELS, keep_decoder_blocks: int = 0, **kwargs) -> None:
        super().__init__(in_channels=in_channels, out_channels=1, features=features, **kwargs)
        self.out_channels = int(self.features[-1])
        self.kept_decoder_blocks = keep_decoder_blocks
        for parent in self.modules():
            for name, child in list(parent.named_children()):
                if any(child is up for up in self.decoder_blocks()[keep_decoder_blocks:]):
                    setattr(parent, name, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[-1]


def decoded_channels(features: Sequence[int], num_decoder_blocks: int = 0) -> int:
    """Channels of the map after the first ``num_decoder_blocks`` up blocks of a :class:`SegmentationUNet` with these
    ``features`` (0: the deepest encoder features, ``features[-1]``).  Up block ``l`` (deepest first) joins the skip of
    width ``features[-1 - l]`` and returns the width of the level above it, ``features[-2 - l]``."""
    return int(features[-2 - num_decoder_blocks] if num_decoder_blocks else features[-1])


def encoder_state_dict(module: nn.Module, num_decoder_blocks: int = 0) -> dict[str, torch.Tensor]:
    """The U-Net weights a pre-training run hands to fine-tuning.

    ``module`` is a :class:`SegmentationUNet` / :class:`UNetEncoder`, or a wrapper holding one as
    ``.encoder`` or ``.unet``.
    """
    inner = next((m for m in (getattr(module, "unet", None), getattr(module, "encoder", None), module) if isinstance(m, SegmentationUNet)), None)
    if inner is None:
        raise TypeError(f"{type(module).__name__} holds no SegmentationUNet as .unet or .encoder")
    return inner.pretrained_state_dict(num_decoder_blocks)


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
