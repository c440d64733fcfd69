from .contrastive import meta_label_contrastive, meta_label_positive_mask, multi_positive_info_nce, nt_xent, positive_mask, view_ids
from .gcl import GCLLoss
from .glcl import GlobalContrastiveLoss, LocalContrastiveLoss, global_masks, local_masks, local_regions, region_corners
from .ideal import (
    CorrespondingViewsPrepareBatch,
    IDEALLoss,
    dense_info_nce,
    global_info_nce,
    two_views_with_grids,
    view_correspondence,
)
from .macl import MACLLoss, dense_contrastive, equivariant_regularisation, global_contrastive, position_positive_mask
from .pixel_contrastive import PixelContrastiveLoss, positive_gradient_norms
from .simclr import SimCLRLoss
from .spcl import SPCLLoss, self_paced_regulariser, self_paced_weights
