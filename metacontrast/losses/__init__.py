from .contrastive import meta_label_contrastive, meta_label_positive_mask, multi_positive_info_nce, nt_xent, positive_mask, view_ids
from .gcl import GCLLoss
from .pixel_contrastive import PixelContrastiveLoss, positive_gradient_norms
