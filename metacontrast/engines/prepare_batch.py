"""Batch preparation for contrastive pre-training (a MONAI ``PrepareBatch``).

The slice cache already sits on the training device, so the two augmented views are drawn here, as a
batched on-device operation, rather than per sample in the data loader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.engines.utils import PrepareBatch


class TwoViewPrepareBatch(PrepareBatch):
    """``{"image": (N, 1, H, W), <meta>: (N,)}`` -> ``(cat(view1, view2) (2N, 1, H, W), {meta: (N,)})``.

    ``make_views`` may return more than two views (GLCL's ``G^D`` batches hold the untransformed image
    too): the result is then their concatenation, ``(V N, 1, H, W)``.

    Args:
        make_views: callable mapping an image batch to its augmented views (usually two).
        meta_keys: meta labels handed to the loss as targets.
        image_key: key of the images in the batch.
    """

    def __init__(self, make_views: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], meta_keys: Sequence[str], image_key: str = "image") -> None:
        self.make_views = make_views
        self.meta_keys = list(meta_keys)
        self.image_key = image_key

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        images = batchdata[self.image_key].to(device, non_blocking=non_blocking)
        views = self.make_views(images)
        meta = {key: batchdata[key].to(device, non_blocking=non_blocking) for key in self.meta_keys}
        return torch.cat(list(views)), meta


class AugmentedPrepareBatch(PrepareBatch):
    """``{"image", "label"}`` slice batch -> ``(augmented image, augmented label)`` on ``device``.

    ``augment(images, labels) -> (images, labels)`` applies the same spatial transform to both; the
    label comes back as float class values (B, 1, H, W), which MONAI's Dice/CE losses one-hot encode.
    """

    def __init__(self, augment: Callable | None = None) -> None:
        self.augment = augment

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        images = batchdata["image"].to(device, non_blocking=non_blocking)
        labels = batchdata["label"].to(device, non_blocking=non_blocking)
        if self.augment is not None:
            images, labels = self.augment(images, labels)
        return images, labels.float()
