"""Batches that pair the labelled slices of a step with unlabelled ones (a MONAI ``PrepareBatch``).

The trainer's loader yields the labelled batch; the unlabelled slices come from a second, endless
stream over the ``train`` volumes that are not labelled (``FinetuneData.unlabeled_loader``).  Both are
augmented with the fine-tune augmentation and handed to the network as one batch, labelled first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from ..engines.prepare_batch import AugmentedPrepareBatch


class UnlabeledStream:
    """Endless batches from ``loader``: a new pass starts when one ends.

    The pass is opened lazily, on the first batch, so a sampler restored from a training checkpoint
    before that (``TrainingCheckpointer`` resumes on ``STARTED``) continues where it stopped.
    """

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]]) -> None:
        self.loader = loader
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):  # at most one exhausted pass before a fresh one
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise RuntimeError("the unlabelled loader yields no batch")


class SemiSupervisedPrepareBatch(AugmentedPrepareBatch):
    """Labelled batch + the next unlabelled batch -> ``(cat(x_l, x_u), {"label": y_l, ...})``.

    Images: ``x_l`` (B_l, 1, H, W) and ``x_u`` (B_u, 1, H, W) augmented independently (labelled first),
    concatenated to (B_l + B_u, 1, H, W); the loss splits predictions at ``B_l = label.shape[0]``.
    Targets: ``{"label": (B_l, 1, H, W) float class values}`` plus, when ``unlabeled_targets`` is given,
    ``{"unlabeled": unlabeled_targets(x_u)}`` (Mean Teacher: the teacher's probabilities).

    Args:
        unlabeled: batches of unlabelled slices (dicts with ``image``); wrapped in :class:`UnlabeledStream`.
        augment: ``augment(images, labels) -> (images, labels)`` (labels ``None`` for unlabelled slices).
        unlabeled_targets: optional ``x_u -> targets`` computed without gradient.
    """

    def __init__(self, unlabeled: Iterable[dict[str, torch.Tensor]] | None, augment: Callable | None = None,
                 unlabeled_targets: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(augment)
        if unlabeled is None:
            raise ValueError("semi-supervised fine-tuning needs unlabelled slices (FinetuneData(unlabeled_batch_size > 0))")
        self.stream = UnlabeledStream(unlabeled)
        self.unlabeled_targets = unlabeled_targets

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        images, labels = super().__call__(batchdata, device, non_blocking, **kwargs)
        unlabeled = next(self.stream)["image"].to(device, non_blocking=non_blocking)
        if self.augment is not None:
            unlabeled = self.augment(unlabeled)[0]
        targets = {"label": labels}
        if self.unlabeled_targets is not None:
            with torch.no_grad():
                targets["unlabeled"] = self.unlabeled_targets(unlabeled)
        return torch.cat([images, unlabeled]), targets


def split_labeled(pred: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred`` (B_l + B_u, ...) -> (labelled part, unlabelled part), split at ``targets["label"].shape[0]``."""
    num_labeled = targets["label"].shape[0]
    return pred[:num_labeled], pred[num_labeled:]
