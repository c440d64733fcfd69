"""Mixup (Zhang et al., ICLR 2018) of labelled slices as a fine-tuning add-on.

For a batch ``(x, y)`` and a permutation ``pi`` of it, ``x~ = lam x + (1 - lam) x_pi`` and
``y~ = lam y + (1 - lam) y_pi`` with one-hot ``y`` and ``lam ~ Beta(alpha, alpha)``, one ``lam`` per batch as
in the paper; the network is trained on ``(x~, y~)`` with Dice + cross-entropy on the soft labels
(MONAI's ``DiceCELoss`` without ``to_onehot_y``: its cross-entropy takes class probabilities as the target).
Mixed after the fine-tune augmentation; only labelled slices are used (Mixup is a supervised regulariser).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from scipy.special import betaincinv

from ..engines.prepare_batch import AugmentedPrepareBatch


def sample_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """``lam ~ Beta(alpha, alpha)`` by inverse-transform sampling of one uniform draw from ``generator``.

    (``torch.distributions.Beta`` cannot take a generator, and the generator is what a training
    checkpoint saves, so a resumed run draws the same ``lam``.)
    """
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    u = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device if generator is not None else "cpu")
    return float(betaincinv(alpha, alpha, float(u)))


def mixup(images: torch.Tensor, soft_labels: torch.Tensor, lam: float, permutation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam x + (1 - lam) x[pi], lam y + (1 - lam) y[pi])`` for ``x`` (B, 1, H, W), ``y`` (B, C, H, W), ``pi`` (B,).

    Each mixed label is a convex combination of two per-pixel distributions, so it sums to 1 over the
    classes at every pixel, and the batch's total mass of each class is unchanged (``pi`` is a permutation).
    """
    idx = permutation.to(images.device)
    mix = lambda t: lam * t + (1.0 - lam) * t.index_select(0, idx)
    return mix(images), mix(soft_labels)


class MixupPrepareBatch(AugmentedPrepareBatch):
    """``{"image", "label"}`` slice batch -> augmented, mixed ``(x~ (B, 1, H, W), y~ (B, C, H, W))``.

    Args:
        num_classes: ``C``, classes including background (labels are one-hot encoded to C channels).
        alpha: the Beta distribution's parameter.
        augment: the fine-tune augmentation (applied before mixing).
        generator: draws ``lam`` and the permutation (pass the augmentation's, saved in training checkpoints).
    """

    def __init__(self, num_classes: int, alpha: float = 0.2, augment: Callable | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(augment)
        if not alpha > 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        self.num_classes, self.alpha, self.generator = int(num_classes), float(alpha), generator
        self.last_lambda: float | None = None

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        images, labels = super().__call__(batchdata, device, non_blocking, **kwargs)
        onehot = F.one_hot(labels[:, 0].long(), self.num_classes).movedim(-1, 1).to(images.dtype)
        self.last_lambda = sample_lambda(self.alpha, self.generator)
        gen_device = self.generator.device if self.generator is not None else "cpu"
        permutation = torch.randperm(images.shape[0], generator=self.generator, device=gen_device)
        return mixup(images, onehot, self.last_lambda, permutation)
