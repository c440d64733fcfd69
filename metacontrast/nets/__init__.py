from .heads import EncoderWithHeads, ProjectionHead, pooled_embedding
from .unet import (
    DECODER_BLOCKS,
    ENCODER_BLOCKS,
    PretrainedWeightsMismatch,
    SegmentationUNet,
    UNetEncoder,
    encoder_state_dict,
    load_pretrained,
)
