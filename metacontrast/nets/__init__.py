from .heads import DecoderWithHeads, EncoderWithHeads, PooledProjectionHead, ProjectionHead, gcl_heads, gcl_network, pooled_embedding
from .macl import MACLNetwork, PixelProjector, downsample, pad_to_multiple
from .unet import (
    DEFAULT_CHANNELS,
    PretrainedWeightsMismatch,
    SegmentationUNet,
    UNetEncoder,
    decoded_channels,
    encoder_state_dict,
    load_pretrained,
)
