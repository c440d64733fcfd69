"""SimCLR's NT-Xent objective (Chen et al., ICML 2020, Eq. 1) as a pre-training loss function.

The two views of each slice are each other's only positive; every other image of the 2N is a
negative.  The kernel is :func:`~metacontrast.losses.contrastive.nt_xent` (the multi-positive InfoNCE
with view positives only); this module adapts it to the trainer's ``loss_function(outputs, targets)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..nets.heads import pooled_embedding
from .contrastive import multi_positive_info_nce, positive_mask, view_ids
from .yardsticks import yardstick_terms


class SimCLRLoss(nn.Module):
    """NT-Xent on the pooled, L2-normalised projection of the two views.

    Args:
        temperature: tau (0.1 in the GCL paper's SimCLR baseline, following [10]).
        key: name of the projection-head output of the network.
    """

    def __init__(self, temperature: float = 0.1, key: str = "img") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.key = key
        self.last_terms: dict[str, float] = {}

    def forward(self, outputs: Mapping[str, torch.Tensor], targets: object = None) -> dict[str, torch.Tensor]:
        """``outputs[key]``: (2N, D, h, w) for ``cat(view1, view2)``; ``targets`` (meta labels) are unused.

        Returns ``{"views": L}``; ``last_terms`` holds its chance level and minimum (:mod:`~metacontrast.losses.yardsticks`).
        """
        z = pooled_embedding(outputs[self.key])
        positives = positive_mask(view_ids(len(z) // 2, z.device))
        self.last_terms = yardstick_terms("loss/views", positives)
        return {"views": multi_positive_info_nce(z, positives, self.temperature)}
