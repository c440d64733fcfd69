"""Cross pseudo supervision, IDEAL's semi-supervised fine-tuning (Kundu et al., ICASSP 2023, Sec. 2.3, Eq. 3).

A shared encoder with two decoders (:class:`~metacontrast.nets.dual_decoder.DualDecoderUNet`) predicts
``p_1`` and ``p_2``.  Labelled slices: ``CE(p_1, m) + CE(p_2, m)``; unlabelled slices: each decoder's
hard label ``y_j = argmax p_j`` supervises the other, ``CE(p_1, y_2) + CE(p_2, y_1)``, with no gradient
through ``y_j`` (an argmax has none; it is detached as well).  Eq. 3 as a sum over both parts:
``L = sum_k [S(p_1, m) + S(p_2, m)] + lambda [CE(p_1, y_2) + CE(p_2, y_1)]``.

Choices where the paper is silent or does not fit (config keys in ``semi_supervised_settings``):
the supervised term ``S`` is MONAI's ``DiceCELoss`` as in every other fine-tune (``lambda_dice = 0``
gives Eq. 3's plain cross-entropy); ``lambda = cps_weight`` (Eq. 3 has none: 1.0); softmax over the
classes instead of the paper's per-class sigmoid and threshold (ours are mutually exclusive labels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from torch import nn

from .batches import split_labeled


class DualDecoderInferer(Inferer):
    """``network.forward_both(x)`` stacked: (B, 2, C, H, W), decoder 1 (transposed convolutions) first."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.stack(network.forward_both(inputs, *args, **kwargs), dim=1)


def cross_pseudo_supervision(logits_1: torch.Tensor, logits_2: torch.Tensor) -> torch.Tensor:
    """``CE(p_1, y_2) + CE(p_2, y_1)`` with ``y_j = argmax_c logits_j`` detached; logits (B, C, H, W) -> scalar.

    Each cross-entropy is the mean over pixels; its gradient reaches only the branch being supervised.
    """
    pseudo_1, pseudo_2 = logits_1.detach().argmax(dim=1), logits_2.detach().argmax(dim=1)
    return F.cross_entropy(logits_1.float(), pseudo_2) + F.cross_entropy(logits_2.float(), pseudo_1)


class CrossPseudoSupervisionLoss(nn.Module):
    """IDEAL's fine-tuning objective (Eq. 3, see the module doc).

    ``forward(pred, targets)``: ``pred`` (B_l + B_u, 2, C, H, W) from :class:`DualDecoderInferer`,
    labelled first; ``targets`` ``{"label": (B_l, 1, H, W)}``.  Returns the scalar total; ``last_terms``
    holds the supervised and cross-pseudo terms for logging.

    Args:
        supervised: ``S(logits (B_l, C, H, W), label (B_l, 1, H, W)) -> scalar``.
        cps_weight: ``lambda``, the weight of the cross pseudo supervision term.
    """

    def __init__(self, supervised: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cps_weight: float = 1.0) -> None:
        super().__init__()
        if cps_weight < 0:
            raise ValueError(f"cross pseudo supervision cps_weight must be >= 0, got {cps_weight}")
        self.supervised = supervised
        self.cps_weight = float(cps_weight)
        self.last_terms: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, targets: dict[str, Any]) -> torch.Tensor:
        labeled, unlabeled = split_labeled(pred, targets)
        supervised = self.supervised(labeled[:, 0], targets["label"]) + self.supervised(labeled[:, 1], targets["label"])
        cps = cross_pseudo_supervision(unlabeled[:, 0], unlabeled[:, 1])
        self.last_terms = {"supervised": float(supervised.detach()), "cross_pseudo": float(cps.detach())}
        return supervised + self.cps_weight * cps
